"""The runner agent: assignment → launch → report; reconnects; drains on SIGTERM.

The agent keeps one stream to the control plane. It says hello with its id
(kept across reconnects) and the builds it is still running, heartbeats on
the stream, takes assignments up to its capacity and stops builds it is told
to cancel. When the stream breaks it reconnects with backoff and jitter;
running builds go on meanwhile, their logs and reports waiting in their own
retrying queues.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.logging_setup import release
from common.tasks import cancel_and_wait
from runner.build_run import BuildRun
from runner.cache import BuildCache
from runner.config import RunnerSettings
from runner.control_client import RPC_RETRY, ControlClient
from runner.domain import (
    Ack,
    Assignment,
    Cancel,
    Heartbeat,
    Hello,
    Registered,
    RunnerMessage,
)
from runner.launchers.base import Launcher
from runner.metrics import RunnerMetrics

log = logging.getLogger(__name__)


class Agent:
    """Call ``run()`` to work until ``drain()`` (SIGTERM) has finished."""

    def __init__(
        self,
        settings: RunnerSettings,
        launcher: Launcher,
        metrics: RunnerMetrics,
        *,
        sandboxed: bool = True,
        cache: BuildCache | None = None,
        runner_id: str | None = None,
    ) -> None:
        """``runner_id`` is the identity kept across restarts (see
        ``runner.identity``); without it the agent is a new runner."""
        self.settings = settings
        self.cache = cache
        self.launcher = launcher
        self.metrics = metrics
        self.sandboxed = sandboxed
        self.runner_id = runner_id or str(uuid.uuid4())
        self.client = ControlClient(
            settings.control_addr, settings.token, tls_ca=settings.tls_ca,
            addresses_file=settings.control_addr_file,
        )  # fmt: skip
        self.runs: dict[str, BuildRun] = {}
        self.tasks: dict[str, asyncio.Task[object]] = {}
        self.draining = False
        self.connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._outbox: asyncio.Queue[RunnerMessage] | None = None
        self.metrics.capacity.set(settings.capacity)
        self.heartbeat_seconds = 5.0

    async def run(self) -> None:
        # Reconnects start a little slower than an RPC's retries: a broken
        # stream usually means the control plane is restarting.
        backoff = replace(RPC_RETRY, base=0.2).backoff()
        while not self._stop.is_set():
            session = asyncio.create_task(self._session(), name="runner-session")
            stopper = asyncio.create_task(self._stop.wait())
            try:
                await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(stopper, session)
            if self._stop.is_set():
                break
            exc = session.exception()
            if exc is None:
                backoff.succeeded()
                continue
            self.connected.clear()
            log.warning("control plane stream broke: %s; reconnecting", _short(exc))
            self.metrics.reconnects.inc()
            await backoff.wait()
        await self._finish()

    async def _session(self) -> None:
        outbox: asyncio.Queue[RunnerMessage] = asyncio.Queue()
        self._outbox = outbox
        outbox.put_nowait(
            Hello(
                runner_id=self.runner_id,
                name=self.settings.name,
                capacity=0 if self.draining else self.settings.capacity,
                labels=tuple(self.settings.labels),
                launcher=self.launcher.name,
                sandbox=sandbox_mode(self.launcher.name, sandboxed=self.sandboxed),
                version=release(),
                running_build_ids=tuple(self.runs),
            )
        )

        async def requests() -> AsyncIterator[RunnerMessage]:
            while True:
                yield await outbox.get()

        heartbeat = asyncio.create_task(self._heartbeat(outbox))
        try:
            async for message in self.client.connect(requests()):
                if isinstance(message, Registered):
                    self.heartbeat_seconds = float(message.heartbeat_seconds or 5)
                    self.connected.set()
                    log.info("registered with the control plane as %s", self.runner_id)
                elif isinstance(message, Assignment):
                    self._take(message, outbox)
                elif isinstance(message, Cancel):
                    run = self.runs.get(message.build_id)
                    if run is not None:
                        log.info(
                            "stopping build: %s", message.reason,
                            extra={"build_id": run.build_id},
                        )  # fmt: skip
                        await run.cancel(message.reason, message.grace_seconds or 10)
        finally:
            await cancel_and_wait(heartbeat)
            self._outbox = None
            self.connected.clear()

    def _heartbeat_message(self) -> Heartbeat:
        return Heartbeat(busy=len(self.runs), draining=self.draining)

    async def _heartbeat(self, outbox: asyncio.Queue[RunnerMessage]) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            outbox.put_nowait(self._heartbeat_message())

    def _take(self, assignment: Assignment, outbox: asyncio.Queue[RunnerMessage]) -> None:
        build_id = assignment.build_id
        if build_id in self.runs:
            return
        if self.draining or len(self.runs) >= self.settings.capacity:
            outbox.put_nowait(Ack(build_id, accepted=False, reason="runner busy"))
            return
        run = BuildRun(
            assignment, self.client, self.launcher, self.metrics, self.settings.limits,
            self.sandboxed, cache=self.cache, cache_staging=self.settings.cache_staging,
        )  # fmt: skip
        self.runs[build_id] = run
        self.metrics.busy.set(len(self.runs))
        task = asyncio.create_task(run.run(), name=f"build-{build_id}")
        self.tasks[build_id] = task
        task.add_done_callback(lambda _t: self._done(build_id))
        outbox.put_nowait(Ack(build_id, accepted=True))

    def _done(self, build_id: str) -> None:
        self.runs.pop(build_id, None)
        self.tasks.pop(build_id, None)
        self.metrics.busy.set(len(self.runs))
        if self.draining and not self.runs:
            self._stop.set()

    async def drain(self) -> None:
        """Take no new builds; let running ones finish within the drain time,
        then stop them (they end canceled with their logs) and exit."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d build(s) running", len(self.runs))
        if self._outbox is not None:
            # Say so at once: the control plane stops sending new builds.
            self._outbox.put_nowait(self._heartbeat_message())
        if not self.runs:
            self._stop.set()
            return
        try:
            await asyncio.wait_for(self._stop.wait(), self.settings.drain_seconds)
        except TimeoutError:
            for run in list(self.runs.values()):
                await run.cancel("runner shut down", 10)
            self._stop.set()

    async def _finish(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.launcher.close()
        await self.client.close()


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        return str(details())
    return str(exc)


async def serve_metrics(metrics: RunnerMetrics, addr: str) -> web.AppRunner:
    """Serve ``/metrics`` and ``/healthz`` of the runner on ``addr``."""

    async def metrics_endpoint(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = addr.rpartition(":")
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner


def sandbox_mode(launcher: str, *, sandboxed: bool) -> str:
    """The isolation this runner's builds get, as its hello reports it:
    "bubblewrap" or "none" for the local launcher, the launcher's name (its
    own isolation: a Nomad job) for the others."""
    if not sandboxed:
        return "none"
    return "bubblewrap" if launcher == "local" else launcher
