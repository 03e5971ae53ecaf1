"""Runners that went silent or came back: their builds end, or go back to
the queue when they never started."""

from __future__ import annotations

import logging
import time

from control.builds.transitions import QueueChanged, Transitions, now
from control.config import LifecycleSettings
from control.domain.build import Build, BuildStatus
from control.errors import FailedPrecondition
from control.metrics import ControlMetrics
from control.storage.assignments import notify
from control.storage.db import Conn
from control.storage.ids import is_uuid
from control.storage.runners import RunnerStore

log = logging.getLogger(__name__)


class LostRunners:
    def __init__(
        self,
        transitions: Transitions,
        runners: RunnerStore,
        metrics: ControlMetrics,
        settings: LifecycleSettings,
    ) -> None:
        self.transitions = transitions
        self.builds = transitions.builds
        self.assignments = transitions.assignments
        self.runners = runners
        self.metrics = metrics
        self.settings = settings
        # Since when this process could have heard every runner's heartbeat
        # (None while the database is unreachable): a runner is declared
        # lost only after a whole ``runner_lost_after`` of hearing nothing,
        # so a control-plane restart or a database outage never passes for
        # the loss of every runner.
        self._hearing_since: float | None = time.monotonic()

    async def reap(self) -> int:
        """Error the running builds of runners silent past the bound; put their
        accepted-but-not-started builds back in the queue. Returns builds touched.

        Reaps nothing until this process has been able to hear runners for
        the whole bound (after its start, or after the database came back);
        raises the database's errors (``Unavailable``) unchanged."""
        try:
            return await self._reap()
        except Exception:
            self._hearing_since = None
            raise

    async def _reap(self) -> int:
        if self._hearing_since is None:
            self._hearing_since = time.monotonic()
        if time.monotonic() - self._hearing_since < self.settings.runner_lost_after:
            return 0
        touched = 0
        async with self.transitions.transaction() as conn:
            for runner_id in await self.runners.lost(conn, self.settings.runner_lost_after):
                self.metrics.runners_lost.inc()
                log.warning("runner %s lost", runner_id)
                await self.runners.disconnect(conn, runner_id)
                for held in await self.assignments.lock_held(conn, runner_id, dispatched=False):
                    build = await self.builds.get_in(conn, None, held.id)
                    if build.status == BuildStatus.QUEUED:
                        if await self._requeue(conn, build):
                            log.info(
                                "runner lost; build back in the queue", extra={"build_id": build.id}
                            )
                    else:
                        await self.transitions.move(
                            conn, build, BuildStatus.ERRORED, "runner lost", now()
                        )
                    touched += 1
        return touched

    async def _requeue(self, conn: Conn, build: Build) -> bool:
        """Take a queued build (locked by the caller) back from its runner:
        it never started. Returns True when it went back to the queue; a
        build someone asked to stop ends instead, in the state asked for."""
        asked = build.stop_request
        if asked is not None:
            status = asked.status or BuildStatus.CANCELED
            await self.transitions.move(conn, build, status, asked.reason or "stopped", now())
            return False
        await self.assignments.unassign(conn, build.id)
        await self.builds.disarm(conn, build.id, ["startup"])
        await notify(conn, "conveyor_queue", "")
        self.transitions.record(conn, QueueChanged())
        return True

    async def forget_missing(self, runner_id: str, running: set[str]) -> None:
        """Reconcile with a runner that (re)connected saying it runs ``running``.

        Builds we handed it that it does not have: a queued one (the
        assignment was lost on the way, or the runner restarted before
        starting it) goes back to the queue; a started one errored with the
        runner. Stops it may have missed while away are sent again, and a
        build it still runs that ended here meanwhile is stopped.
        """
        errored: list[str] = []
        async with self.transitions.transaction() as conn:
            for held in await self.assignments.lock_held(conn, runner_id, dispatched=True):
                if held.id in running:
                    continue
                if held.status != BuildStatus.QUEUED:
                    errored.append(held.id)
                    continue
                build = await self.builds.get_in(conn, None, held.id)
                if await self._requeue(conn, build):
                    log.info(
                        "runner came back without the build; requeued",
                        extra={"build_id": build.id},
                    )
            ids = [b for b in running if is_uuid(b)]
            await self.assignments.stop_ended(conn, runner_id, ids)
        for build_id in errored:
            try:
                await self.transitions.report(
                    build_id, BuildStatus.ERRORED, reason="runner lost (restarted)"
                )
            except FailedPrecondition:
                pass
