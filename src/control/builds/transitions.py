"""The one write path of build state.

``Transitions.move`` is the only function that changes a build's status:
it checks the move with the pure ``check_transition``, writes the status,
closes steps, arms and disarms alarms and NOTIFYs, and records what changed
as events of the caller's ``transaction()``. The events (metrics, local
wake-ups, listeners such as the forge reporter) are published once that
transaction commits, and dropped when it rolls back, so nobody hears of a
change that did not happen.

Runner reports, cancels and warnings are written here too; queueing,
placement, dispatch, alarms and lost runners (the other modules of
``builds/``) call ``move`` for every status they change.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from control.config import LifecycleSettings
from control.domain.build import Build, BuildStatus, StepStatus, check_transition
from control.errors import FailedPrecondition
from control.metrics import ControlMetrics
from control.storage.assignments import AssignmentStore, notify
from control.storage.builds import BuildStore
from control.storage.db import Conn, Database
from control.storage.notify import Notifier

log = logging.getLogger(__name__)
# A project deleted under a running build: the default run timeout.
DEFAULT_RUN_TIMEOUT = 1200


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Queued:
    """A build was queued."""

    build_id: str
    trigger: str


@dataclass(frozen=True)
class Changed:
    """``build`` (as it was before) moved to ``status`` at ``at``."""

    build: Build
    status: BuildStatus
    at: datetime


@dataclass(frozen=True)
class RunnerNudged:
    """The runner has something new on its stream (an assignment, a stop)."""

    runner_id: str


@dataclass(frozen=True)
class QueueChanged:
    """Builds went back to the queue: the scheduler may place them."""


Event = Queued | Changed | RunnerNudged | QueueChanged


@dataclass(frozen=True)
class StepReport:
    index: int
    status: StepStatus
    exit_code: int | None
    at: datetime


class Transitions:
    """Owns the events of open transactions and the listeners that hear of
    committed changes."""

    def __init__(
        self,
        db: Database,
        builds: BuildStore,
        assignments: AssignmentStore,
        notifier: Notifier,
        metrics: ControlMetrics,
        settings: LifecycleSettings,
    ) -> None:
        self.db = db
        self.builds = builds
        self.assignments = assignments
        self.notifier = notifier
        self.metrics = metrics
        self.settings = settings
        # Called with a build id after every committed change of that build
        # (queued, superseded, each transition). A listener must return at
        # once and never raise: it runs on the path of the change.
        self.listeners: list[Callable[[str], None]] = []
        # What each open ``transaction()`` changed, published once it
        # commits (and dropped if it rolls back).
        self._pending: dict[Conn, list[Event]] = {}

    # --- transactions and events -------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A transaction whose changes (``move``, ``record``) are published
        once it commits, never before, and not at all when it rolls back.
        Callers that queue builds among writes of their own take it too."""
        events: list[Event] = []
        async with self.db.transaction() as conn:
            self._pending[conn] = events
            try:
                yield conn
            finally:
                self._pending.pop(conn, None)
        self._publish(events)

    def record(self, conn: Conn, event: Event) -> None:
        """Publish ``event`` when ``conn``'s transaction commits. Raises
        ``ValueError`` for a connection that did not come from
        ``transaction()``: its event would have no commit to wait for."""
        self._events(conn).append(event)

    def require(self, conn: Conn) -> None:
        """Raise ``ValueError`` unless ``conn`` came from ``transaction()``."""
        self._events(conn)

    def _events(self, conn: Conn) -> list[Event]:
        events = self._pending.get(conn)
        if events is None:
            raise ValueError("a build change needs a connection from Lifecycle.transaction()")
        return events

    def _publish(self, events: list[Event]) -> None:
        for event in events:
            match event:
                case Queued(build_id, trigger):
                    self.metrics.builds_queued.labels(trigger).inc()
                    self.notifier.publish_local("conveyor_queue", build_id)
                    self._tell(build_id)
                case Changed(build, status, at):
                    self._changed(build, status, at)
                case RunnerNudged(runner_id):
                    self.notifier.publish_local("conveyor_runner", runner_id)
                case QueueChanged():
                    self.notifier.publish_local("conveyor_queue", None)

    def _changed(self, build: Build, status: BuildStatus, at: datetime) -> None:
        extra = {"build_id": build.id, "project_id": build.project_id}
        log.info("build %s", status.value, extra=extra | {"account_id": build.account_id})
        if _started(build.status, status):
            self.metrics.queue_seconds.observe((at - build.created_at).total_seconds())
        if status == BuildStatus.RUNNING and build.received_at is not None:
            self.metrics.push_to_running_seconds.observe((at - build.received_at).total_seconds())
        if status.final:
            self.metrics.builds_finished.labels(status.value).inc()
            if build.started_at is not None:
                self.metrics.build_duration_seconds.labels(status.value).observe(
                    (at - build.started_at).total_seconds()
                )
        self.notifier.publish_local("conveyor_build", f"{build.id}:{status.value}")
        if status.final:
            # A slot is free: the scheduler may start the next build.
            self.notifier.publish_local("conveyor_queue", None)
        self._tell(build.id)

    def _tell(self, build_id: str) -> None:
        for listener in self.listeners:
            try:
                listener(build_id)
            except Exception:
                log.exception("build listener failed", extra={"build_id": build_id})

    # --- the one write ------------------------------------------------------

    async def move(
        self, conn: Conn, build: Build, status: BuildStatus, reason: str, at: datetime
    ) -> None:
        """Move ``build`` (locked by the caller, as read in this transaction)
        to ``status``: check the move, write status and reason, close the
        steps of a final build, arm the run deadline of a started one and
        disarm what no longer applies, NOTIFY, and record the change.
        Raises ``FailedPrecondition`` naming the current state for an
        illegal move, and ``ValueError`` for a ``conn`` not from
        ``transaction()``."""
        check_transition(build.status, status)
        self.record(conn, Changed(build, status, at))
        await self.builds.set_status(conn, build.id, status, at=at, reason=reason)
        if _started(build.status, status):
            await self.builds.disarm(conn, build.id, ["startup"])
            configured = await self.assignments.run_timeout(conn, build.project_id)
            timeout = min(configured or DEFAULT_RUN_TIMEOUT, self.settings.max_run_timeout)
            await self.builds.arm(conn, build.id, "run", at + timedelta(seconds=timeout))
        if status.final:
            await self.builds.close_open_steps(conn, build.id, at)
            await self.builds.disarm(conn, build.id, ["startup", "run", "kill"])
        await notify(conn, "conveyor_build", f"{build.id}:{status.value}")

    async def stop(self, conn: Conn, build: Build, status: BuildStatus, reason: str) -> None:
        """Stop ``build`` (locked by the caller and read in this transaction,
        so its ``dispatched_at`` is current), ending in ``status``: at
        once when no runner was sent it, else by asking its runner, with a
        kill alarm for a stop it never confirms. A final build is left
        alone."""
        if build.status.final:
            return
        if build.dispatched_at is None:
            await self.move(conn, build, status, reason, now())
            return
        await self.assignments.request_stop(conn, build.id, status, reason)
        confirm = self.settings.kill_grace + self.settings.stop_confirm
        await self.builds.arm(conn, build.id, "kill", now() + timedelta(seconds=confirm))
        await self.nudge(conn, build.runner_id)

    async def nudge(self, conn: Conn, runner_id: str | None) -> None:
        """Wake the stream of ``runner_id`` (on any replica) after commit."""
        if runner_id:
            await notify(conn, "conveyor_runner", runner_id)
            self.record(conn, RunnerNudged(runner_id))

    # --- what runners and people ask for ------------------------------------

    async def report(
        self,
        build_id: str,
        status: BuildStatus | None,
        *,
        reason: str = "",
        steps: list[StepReport] | None = None,
        at: datetime | None = None,
        warnings: list[str] | None = None,
    ) -> BuildStatus:
        """Apply a runner's report; returns the build's status afterwards.

        A report of the current status is a no-op; an illegal move raises
        ``FailedPrecondition`` naming the current state.
        """
        at = at or now()
        async with self.transaction() as conn:
            build = await self.builds.get_in(conn, None, build_id, lock=True)
            if build.status.final:
                raise FailedPrecondition(f"build is {build.status.value}; it takes no more reports")
            asked = build.stop_request
            for step in steps or []:
                step_status = step.status
                if asked and step_status == StepStatus.FAILED and _killed(step.exit_code):
                    # The signal we sent ended it (exit 143 after SIGTERM):
                    # the step was canceled, it did not fail.
                    step_status = StepStatus.CANCELED
                await self.builds.update_step(
                    conn, build_id, step.index, step_status, step.exit_code, step.at
                )
            if warnings:
                await self.builds.add_warnings(conn, build_id, warnings)
            if status is None or status == build.status:
                return build.status
            stopped = status in (BuildStatus.CANCELED, BuildStatus.FAILED)
            if stopped and asked and asked.status:
                # A job stopped because we asked ends in the state we asked for.
                status, reason = asked.status, asked.reason or reason
            if status == BuildStatus.SUCCEEDED and not reason:
                # Every final state has a reason, success included.
                reason = "every step succeeded"
            await self.move(conn, build, status, reason, at)
        return status

    async def cancel(self, account_id: str | None, build_id: str, by: str) -> Build:
        """Cancel a build: at once when no runner has it yet, otherwise ask its
        runner to stop the job. Raises ``NotFound`` outside ``account_id``
        and ``FailedPrecondition`` for a final build."""
        async with self.transaction() as conn:
            build = await self.builds.get_in(conn, account_id, build_id, lock=True)
            check_transition(build.status, BuildStatus.CANCELED)
            await self.stop(conn, build, BuildStatus.CANCELED, f"canceled by {by}")
        return await self.builds.get(account_id, build_id)

    async def warn(self, build_id: str, warnings: list[str]) -> None:
        """Add warnings ``builds show`` prints (the same text once). Raises
        ``NotFound`` for an unknown build and ``Unavailable`` unchanged."""
        async with self.db.transaction() as conn:
            await self.builds.get_in(conn, None, build_id)
            await self.builds.add_warnings(conn, build_id, warnings)


def _killed(exit_code: int | None) -> bool:
    """An exit code that says a signal ended the step (128 + signal number,
    or none at all)."""
    return exit_code is None or exit_code > 128 or exit_code < 0


def _started(before: BuildStatus, after: BuildStatus) -> bool:
    """Whether the move starts the build's run (a runner may report running
    before its initializing report lands)."""
    return after == BuildStatus.INITIALIZING or (
        after == BuildStatus.RUNNING and before == BuildStatus.QUEUED
    )
