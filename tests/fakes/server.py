"""What the forge fakes share: an aiohttp server on 127.0.0.1 port 0 that
records every request, can be down (503 or refusing connections) or slow,
and lets a test wait for what it received."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class FakeServer:
    """``mode``: "up", "503" (answers 503 to everything) or "slow" (answers
    after ``slow_seconds``); ``fail_next`` answers that many requests with
    503 first. ``refuse()`` closes the listening socket; ``up()`` opens it
    again on the same port."""

    mode: str = "up"
    slow_seconds: float = 5.0
    fail_next: int = 0
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _site: web.TCPSite | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()
        server = self._site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def refuse(self) -> None:
        """Stop listening: connections are refused until ``up()``."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def up(self) -> None:
        self.mode = "up"
        if self._site is None:
            await self._listen()

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = await request.json() if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        entry = Received(request.method, request.path, dict(request.headers), body)
        self.received.append(entry)
        failing = self.fail_next > 0
        self.fail_next = max(0, self.fail_next - 1)
        if self.mode == "503" or failing:
            response: web.StreamResponse = web.json_response(
                {"message": "Service Unavailable"}, status=503
            )
        else:
            if self.mode == "slow":
                await asyncio.sleep(self.slow_seconds)
            response = await handler(request)
        entry.status = response.status
        self._changed.set()
        return response

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 15.0, what: str = ""
    ) -> None:
        """Return once ``predicate()`` holds, re-checked at each request."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{what or 'condition'} not met within {timeout} s; received "
                    f"{[(r.method, r.path, r.status, r.body) for r in self.received]}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))
            except TimeoutError:
                pass
