"""The scheduler loop: the sole owner of scheduling decisions.

One task per process wakes on a queue NOTIFY, a freed slot, or a tick. A
pass runs only while it holds a transaction-level advisory lock, so with
several replicas one schedules at a time; ``StartBuild`` is idempotent and
locks the build row besides, so a build is never handed out twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from control.metrics import ControlMetrics
from control.scheduler.policy import AccountQueue, QueuedBuild, pick
from control.storage import queue
from control.storage.db import Conn, Database
from control.storage.notify import Notifier
from control.storage.runners import RunnerStore

log = logging.getLogger(__name__)

# BuildManager.StartBuild for a batch: returns the ids it started.
StartFn = Callable[[list[str]], Awaitable[set[str]]]
# Builds per StartBuild call (the RPC's own bound is 1,000).
START_BATCH = 500


class Scheduler:
    """``start_build(build_ids) -> started ids`` is the BuildManager's StartBuild,
    called through its gRPC stub in production. ``global_capacity`` bounds
    the builds holding a slot over all accounts (0: only the runners' slots
    bound them); each account is bounded by ``accounts.concurrency_limit``."""

    def __init__(
        self,
        db: Database,
        runners: RunnerStore,
        notifier: Notifier,
        metrics: ControlMetrics,
        start_build: StartFn,
        *,
        tick: float = 1.0,
        runner_alive: float = 30.0,
        global_capacity: int = 0,
    ) -> None:
        self.db = db
        self.runners = runners
        self.metrics = metrics
        self.start_build = start_build
        self.tick = tick
        self.runner_alive = runner_alive
        self.global_capacity = global_capacity
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        notifier.subscribe("conveyor_queue", lambda _payload: self._wake.set())

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._task:
            # Python 3.11's asyncio.wait_for returns instead of raising when
            # a cancel lands just as the event it waits on fires, and the
            # loop goes on: cancel until the task has ended.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=1.0)
            if not self._task.cancelled():
                self._task.result()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick)
            except TimeoutError:
                pass
            self._wake.clear()
            began = time.perf_counter()
            try:
                started = await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler pass failed")
                self.metrics.scheduler_decisions.labels("error").inc()
                await asyncio.sleep(min(self.tick, 1.0))
                continue
            finally:
                self.metrics.scheduler_tick_seconds.observe(time.perf_counter() - began)
            if started:
                # More may fit now (slots freed meanwhile); look again at once.
                self._wake.set()

    async def pass_once(self) -> int:
        """Start what may start; return how many builds were started.
        Returns 0 at once when another replica's pass holds the lock."""
        async with self.db.transaction() as conn:
            if not await queue.lead(conn):
                return 0
            queues, free = await self._read(conn)
            chosen = pick(queues, free)
            for account in queues:
                if account.active >= account.limit:
                    self.metrics.scheduler_decisions.labels("account_limit").inc()
            if not chosen:
                if queues and free <= 0:
                    self.metrics.scheduler_decisions.labels("no_slot").inc()
                return 0
            # Started while the lock is held: another replica's pass must not
            # pick the same builds before these are assigned.
            started = 0
            for first in range(0, len(chosen), START_BATCH):
                started += await self._start(chosen[first : first + START_BATCH])
        log.debug("scheduler started %d of %d chosen builds", started, len(chosen))
        return started

    async def _read(self, conn: Conn) -> tuple[list[AccountQueue], int]:
        """The waiting accounts and the number of free slots."""
        capacity, busy = await self.runners.free_slots(conn, self.runner_alive)
        free = capacity - busy
        active = await queue.active(conn)
        if self.global_capacity:
            free = min(free, self.global_capacity - sum(active.values()))
        queues = [
            AccountQueue(
                account_id=w.account_id,
                limit=w.limit,
                active=active.get(w.account_id, 0),
                queued=tuple(
                    QueuedBuild(b, t) for b, t in zip(w.build_ids, w.queued_at, strict=True)
                ),
            )
            for w in await queue.waiting(conn)
        ]
        return queues, max(free, 0)

    async def _start(self, build_ids: list[str]) -> int:
        """Start a batch through StartBuild; return how many started."""
        try:
            started = await self.start_build(build_ids)
        except Exception as exc:
            log.warning("StartBuild of %d builds failed: %s", len(build_ids), exc)
            self.metrics.scheduler_decisions.labels("error").inc(len(build_ids))
            return 0
        self.metrics.scheduler_decisions.labels("started").inc(len(started))
        if len(started) < len(build_ids):
            self.metrics.scheduler_decisions.labels("no_runner").inc(len(build_ids) - len(started))
        for build_id in build_ids:
            log.debug(
                "build %s", "started" if build_id in started else "found no runner",
                extra={"build_id": build_id},
            )  # fmt: skip
        return len(started)
