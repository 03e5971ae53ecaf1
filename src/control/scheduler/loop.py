"""The scheduler loop: the sole owner of scheduling decisions.

One task per process wakes on a queue NOTIFY, a freed slot, or a one-second
tick. A pass runs only while it holds a transaction-level advisory lock, so
with several replicas one schedules at a time; ``StartBuild`` is idempotent
besides, so a build is never started twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from control.metrics import ControlMetrics
from control.scheduler.policy import AccountQueue, pick
from control.storage.db import Database, Row
from control.storage.notify import Notifier
from control.storage.runners import RunnerStore

log = logging.getLogger(__name__)

_LEADER_KEY = 0x5C4ED  # advisory lock key of the scheduling pass
StartFn = Callable[[str], Awaitable[bool]]


class Scheduler:
    """``start_build(build_id) -> started`` is the BuildManager's StartBuild,
    called through its gRPC stub in production."""

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
        concurrency: int = 16,
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
        self._sem = asyncio.Semaphore(concurrency)
        notifier.subscribe("conveyor_queue", lambda _payload: self._wake.set())

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

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
        """Start what may start; return how many builds were started."""
        async with self.db.transaction() as conn:
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LEADER_KEY,))
            row = await cur.fetchone()
            if not row or not row[0]:
                return 0
            capacity, busy = await self.runners.free_slots(conn, self.runner_alive)
            free = capacity - busy
            if self.global_capacity:
                cur = await conn.execute(
                    "SELECT count(*) FROM builds WHERE status IN ('initializing', 'running')"
                    " OR (status = 'queued' AND runner_id IS NOT NULL)"
                )
                row = await cur.fetchone()
                free = min(free, self.global_capacity - int(row[0] if row else 0))
            cur = await conn.execute(
                "SELECT a.id, a.concurrency_limit,"
                " (SELECT count(*) FROM builds x WHERE x.account_id = a.id"
                "   AND (x.status IN ('initializing', 'running')"
                "        OR (x.status = 'queued' AND x.runner_id IS NOT NULL))),"
                " q.ids, q.oldest"
                " FROM accounts a JOIN LATERAL ("
                "   SELECT array_agg(id::text ORDER BY created_at) AS ids,"
                "          min(created_at) AS oldest FROM ("
                "     SELECT id, created_at FROM builds b WHERE b.account_id = a.id"
                "     AND b.status = 'queued' AND b.runner_id IS NULL"
                "     ORDER BY created_at LIMIT a.concurrency_limit) s) q ON q.ids IS NOT NULL"
            )
            rows = await cur.fetchall()
            queues = [AccountQueue(str(r[0]), int(r[1]), int(r[2]), tuple(r[3])) for r in rows]
            self._observe_queue(rows)
            chosen = pick(queues, max(free, 0))
            if not chosen:
                if queues:
                    self.metrics.scheduler_decisions.labels("no_slot").inc()
                return 0
            results = await asyncio.gather(*(self._start(b) for b in chosen))
        started = sum(results)
        log.debug("scheduler started %d of %d chosen builds", started, len(chosen))
        return started

    async def _start(self, build_id: str) -> bool:
        async with self._sem:
            try:
                ok = await self.start_build(build_id)
            except Exception as exc:
                log.warning("StartBuild failed: %s", exc, extra={"build_id": build_id})
                self.metrics.scheduler_decisions.labels("error").inc()
                return False
        self.metrics.scheduler_decisions.labels("started" if ok else "no_runner").inc()
        return ok

    def _observe_queue(self, rows: list[Row]) -> None:
        """Queue depth per account (capped at the account limit by the pass's
        query; GetQueue gives exact depths) and the oldest queued build's age."""
        oldest: datetime | None = None
        for account_id, _limit, _active, ids, created in rows:
            self.metrics.queue_depth.labels(str(account_id)).set(len(ids))
            if oldest is None or created < oldest:
                oldest = created
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        self.metrics.oldest_queued_seconds.set(max(age, 0.0))
