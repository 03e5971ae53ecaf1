"""What an HTTP request may cost the control plane before it is trusted.

aiohttp reads a request's headers before any handler runs and its body only
when a handler asks, so the limits sit at three places:

* headers: aiohttp closes a connection that has not sent a complete request
  head within its keep-alive timeout (counted from the connection's start or
  the end of the previous response, not reset by each byte), so
  ``HEADER_SECONDS`` is passed as ``keepalive_timeout`` to the ``AppRunner``;
* body: ``body_deadline`` closes a connection whose body has not fully
  arrived ``BODY_SECONDS`` after its headers, whatever the handler awaits;
* size: ``FORM_MAX_BYTES`` is the application's body limit (the sign-in and
  dashboard forms: an anonymous form costs at most that); the JSON API reads
  its own limit after authentication; webhooks, which must read their body to
  check its signature, get their larger limit through ``WebhookBudget``, which
  also bounds the bytes of all unverified webhook bodies held at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from control.storage.db import RETRY_AFTER
from control.webhooks.receiver import respond

log = logging.getLogger(__name__)

HEADER_SECONDS = 15.0
BODY_SECONDS = 60.0
FORM_MAX_BYTES = 64 * 1024
# Unverified webhook bodies in memory at once; GitHub caps a payload at
# 25 MiB, Conveyor's default webhook limit is 5 MiB: six of those at once.
WEBHOOK_BUDGET_BYTES = 32 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_deadline(seconds: float) -> Middleware:
    """A middleware that closes the connection of a request whose body is
    still arriving ``seconds`` after its headers (a client sending a byte a
    second holds no task and no buffer past that). A request without a body
    (every GET, the SSE streams) is not timed."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists or request.content.is_eof():
            return await handler(request)
        dropped = False

        def expire() -> None:
            nonlocal dropped
            if request.content.is_eof() or request.transport is None:
                return
            dropped = True
            log.warning(
                "dropped a slow client: the body of %s %s from %s did not arrive within %g s",
                request.method, request.path, request.remote, seconds,
            )  # fmt: skip
            request.transport.close()

        timer = asyncio.get_running_loop().call_later(seconds, expire)
        try:
            return await handler(request)
        except ConnectionError:
            if dropped:
                # The handler's read failed because we closed the
                # connection: nobody is left to answer.
                raise web.HTTPRequestTimeout() from None
            raise
        finally:
            # A handler that answered without reading the whole body leaves
            # aiohttp draining the rest on a kept-alive connection: the
            # deadline still holds for that.
            if request.content.is_eof():
                timer.cancel()

    return middleware


class WebhookBudget:
    """Bounds the bytes of webhook bodies held before their signature is
    checked. A request reserves its ``Content-Length`` (or the whole limit
    when it sends none) for as long as its handler runs; when the budget is
    spent it is answered 503 with ``Retry-After`` at once, never queued."""

    def __init__(self, max_body: int, budget: int = WEBHOOK_BUDGET_BYTES) -> None:
        self.max_body = max_body
        self.budget = max(budget, max_body)
        self.held = 0

    def gate(self, handler: Handler) -> Handler:
        """``handler`` behind the budget; the request it gets may read a
        body of up to ``max_body`` bytes."""

        async def gated(request: web.Request) -> web.StreamResponse:
            length = request.content_length
            if length is not None and length > self.max_body:
                # Refused unread: the receiver says so with its own words.
                return await handler(request)
            need = self.max_body if length is None else length
            if self.held + need > self.budget:
                log.warning(
                    "webhook refused: %d bytes of unverified webhook bodies are in flight",
                    self.held,
                )
                response = respond(
                    503, result="busy", error="too many webhook bodies in flight; retry later"
                )
                response.headers["Retry-After"] = str(RETRY_AFTER)
                return response
            self.held += need
            try:
                return await handler(request.clone(client_max_size=self.max_body))
            finally:
                self.held -= need

        return gated
