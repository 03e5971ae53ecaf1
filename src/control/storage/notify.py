"""One LISTEN connection per process, fanning NOTIFY payloads out in memory.

NOTIFY is only ever a wake-up: every subscriber re-reads PostgreSQL when
woken, and after a reconnect every subscriber is woken once (payload None),
because notifications sent while we were away are lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

import psycopg

from common.retry import RetryPolicy
from common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Reconnecting the LISTEN connection: from 0.1 s doubling up to 5 s, plus up
# to half again so replicas do not reconnect in step. No limit: notifications
# are only wake-ups, and every waiter also polls.
RECONNECT = RetryPolicy(base=0.1, cap=5.0, jitter=(1.0, 1.5))

CHANNELS = ("conveyor_queue", "conveyor_runner", "conveyor_logs", "conveyor_build")
Callback = Callable[[str | None], None]


class Notifier:
    """Owns the LISTEN connection. ``subscribe`` registers a synchronous
    callback (it must not block: set an event, put on a queue)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._subs: dict[str, list[Callback]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def subscribe(self, channel: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(payload)`` on every NOTIFY of ``channel``; return
        the function that unsubscribes."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel}")
        self._subs[channel].append(callback)

        def unsubscribe() -> None:
            try:
                self._subs[channel].remove(callback)
            except ValueError:
                pass

        return unsubscribe

    def publish_local(self, channel: str, payload: str | None) -> None:
        """Deliver to this process's subscribers at once (the NOTIFY that the
        same change sends arrives a little later and is harmless)."""
        for callback in list(self._subs[channel]):
            callback(payload)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="notifier")
        await asyncio.wait_for(self.connected.wait(), timeout=30)

    async def stop(self) -> None:
        if self._task:
            await cancel_and_wait(self._task)
            if not self._task.cancelled():
                # An error the LISTEN loop ended with is the caller's to see.
                self._task.result()

    async def _run(self) -> None:
        backoff = RECONNECT.backoff()
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    for channel in CHANNELS:
                        await conn.execute(f"LISTEN {channel}")
                    self.connected.set()
                    backoff.succeeded()
                    self._wake_all()
                    async for note in conn.notifies():
                        self.publish_local(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                # Never None: RECONNECT has no limit.
                delay = backoff.failed(exc) or RECONNECT.cap
                log.warning("LISTEN connection lost (%s); reconnecting in %.1fs", exc, delay)
                self._wake_all()
                await asyncio.sleep(delay)

    def _wake_all(self) -> None:
        for channel in CHANNELS:
            self.publish_local(channel, None)
