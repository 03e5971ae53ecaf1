"""The build lifecycle: the only writer of build state.

Every change runs in one transaction: lock the build row, check the move with
the pure ``check_transition``, write it, then NOTIFY. Events (metrics, local
wake-ups) fire after the commit.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from control.builds.deadlines import run_deadline_reason
from control.config import LifecycleSettings
from control.domain.build import Build, BuildStatus, StepStatus, check_transition, is_allowed
from control.domain.env import FORGE_TOKEN
from control.domain.project import Project, without_fork_privileges
from control.errors import FailedPrecondition, PermissionDenied
from control.metrics import ControlMetrics
from control.storage.accounts import hash_token
from control.storage.builds import BuildStore, is_uuid
from control.storage.db import Conn, Database
from control.storage.env import EnvStore, EnvVar
from control.storage.notify import Notifier
from control.storage.projects import ProjectStore
from control.storage.runners import RunnerStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Queued:
    """A build was queued."""

    build_id: str
    trigger: str


@dataclass(frozen=True)
class _Changed:
    """``build`` (as it was before) moved to ``status`` at ``at``."""

    build: Build
    status: BuildStatus
    at: datetime


_Event = _Queued | _Changed


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class StepReport:
    index: int
    status: StepStatus
    exit_code: int | None
    at: datetime


@dataclass(frozen=True)
class AssignmentData:
    build: Build
    token: str
    project: Project
    step_names: tuple[str, ...]
    step_commands: tuple[str, ...]
    run_timeout: int
    env: tuple[EnvVar, ...] = ()
    # The pull (merge) request the build builds, if any.
    pull_request: int | None = None


def _killed(exit_code: int | None) -> bool:
    """An exit code that says a signal ended the step (128 + signal number,
    or none at all)."""
    return exit_code is None or exit_code > 128 or exit_code < 0


def step_plan(project: Project, production: bool) -> list[tuple[str, str]]:
    """The (name, command) steps of a build after the clone."""
    steps = []
    if project.build_command.strip():
        steps.append(("build", project.build_command))
    last = project.deploy_command if production else project.preview_command
    if last.strip():
        steps.append(("deploy" if production else "preview", last))
    return steps


class Lifecycle:
    def __init__(
        self,
        db: Database,
        builds: BuildStore,
        projects: ProjectStore,
        runners: RunnerStore,
        notifier: Notifier,
        metrics: ControlMetrics,
        settings: LifecycleSettings,
        env: EnvStore,
    ) -> None:
        self.db = db
        self.builds = builds
        self.projects = projects
        self.runners = runners
        self.notifier = notifier
        self.metrics = metrics
        self.settings = settings
        self.env = env
        # Since when this process could have heard every runner's heartbeat
        # (None while the database is unreachable): a runner is declared
        # lost only after a whole ``runner_lost_after`` of hearing nothing,
        # so a control-plane restart or a database outage never passes for
        # the loss of every runner.
        self._hearing_since: float | None = time.monotonic()
        # Called with a build id after every committed change of that build
        # (queued, superseded, each transition). A listener must return at
        # once and never raise: it runs on the path of the change.
        self.listeners: list[Callable[[str], None]] = []
        # What each open ``transaction()`` changed, published once it
        # commits (and dropped if it rolls back).
        self._pending: dict[Conn, list[_Event]] = {}

    # --- queueing ---------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A transaction for callers that queue builds among writes of their
        own (``queue(conn=...)``). What it changes (the build queued, the
        builds it superseded or canceled) is published (metrics, NOTIFY
        wake-ups in this process, listeners) once it commits, never before,
        and not at all when it rolls back."""
        events: list[_Event] = []
        async with self.db.transaction() as conn:
            self._pending[conn] = events
            try:
                yield conn
            finally:
                self._pending.pop(conn, None)
        self._publish(events)

    @asynccontextmanager
    async def _joined(self, conn: Conn | None) -> AsyncIterator[tuple[Conn, list[_Event]]]:
        """The caller's ``transaction()`` when given its connection, else a
        new one; yields the connection and the events to publish after it
        commits. Raises ``ValueError`` for a connection that did not come
        from ``transaction()``: its events would have no commit to wait for."""
        if conn is None:
            async with self.transaction() as own:
                yield own, self._pending[own]
            return
        events = self._pending.get(conn)
        if events is None:
            raise ValueError("queue(conn=...) needs a connection from Lifecycle.transaction()")
        yield conn, events

    def _publish(self, events: list[_Event]) -> None:
        for event in events:
            if isinstance(event, _Queued):
                self.metrics.builds_queued.labels(event.trigger).inc()
                self.notifier.publish_local("conveyor_queue", event.build_id)
                self._tell(event.build_id)
            else:
                self._after(event.build, event.status, event.at)

    async def queue(
        self,
        project: Project,
        *,
        branch: str,
        commit_sha: str,
        trigger: str,
        production: bool | None = None,
        retry_of: str | None = None,
        received_at: datetime | None = None,
        conn: Conn | None = None,
    ) -> str:
        """Queue a build; supersede the branch's older queued builds (and, with
        ``cancel_in_progress``, stop its running ones). Returns the build id.

        With ``conn`` the caller commits; take it from ``transaction()`` so
        the listeners hear of the change after the commit."""
        if production is None:
            production = branch == project.production_branch
        names = ["clone"] + [name for name, _ in step_plan(project, production)]
        async with self._joined(conn) as (tx, events):
            build_id = await self._queue_in(
                tx,
                events,
                project,
                branch,
                commit_sha,
                trigger,
                production,
                retry_of,
                received_at,
                names,
            )
        log.info("build queued", extra={"build_id": build_id, "project_id": project.id})
        return build_id

    async def _queue_in(
        self,
        conn: Conn,
        events: list[_Event],
        project: Project,
        branch: str,
        commit_sha: str,
        trigger: str,
        production: bool,
        retry_of: str | None,
        received_at: datetime | None,
        names: list[str],
    ) -> str:
        """Insert the build and return its id; supersede (and, with
        ``cancel_in_progress``, cancel) the branch's older builds through the
        checked transition. Appends what changed to ``events``."""
        build_id = await self.builds.insert(
            conn,
            project_id=project.id,
            account_id=project.account_id,
            branch=branch,
            commit_sha=commit_sha,
            trigger=trigger,
            production=production,
            step_names=names,
            retry_of=retry_of,
            received_at=received_at,
        )
        if retry_of is not None:
            # A retry of a pull request's build is that request's too: its
            # close cancels it, and its cache scope stays the request's.
            await conn.execute(
                "INSERT INTO pull_request_builds (build_id, project_id, number, fork)"
                " SELECT %s, project_id, number, fork FROM pull_request_builds"
                " WHERE build_id = %s",
                (build_id, retry_of),
            )
        events.append(_Queued(build_id, trigger))
        if trigger != "retry":
            at = now()
            for old in await self.builds.undispatched_on_branch(conn, project.id, branch, build_id):
                # The same checked write as every other transition: status,
                # steps (pending ones skipped), alarms, NOTIFY.
                check_transition(old.status, BuildStatus.SUPERSEDED)
                await self._write(
                    conn, old, BuildStatus.SUPERSEDED, f"superseded by build {build_id}", at
                )
                events.append(_Changed(old, BuildStatus.SUPERSEDED, at))
            if project.cancel_in_progress:
                for old_id in await self.builds.active_on_branch(conn, project.id, branch):
                    if old_id == build_id:
                        continue
                    before = await self.builds.get_in(conn, None, old_id)
                    if await self._request_stop(
                        conn,
                        old_id,
                        BuildStatus.CANCELED,
                        f"canceled: superseded by build {build_id}",
                    ):
                        events.append(_Changed(before, BuildStatus.CANCELED, now()))
        await conn.execute("SELECT pg_notify('conveyor_queue', %s)", (build_id,))
        return build_id

    # --- assignment -------------------------------------------------------

    async def start(self, build_id: str) -> str | None:
        """Hand a queued build to the least busy live runner with a free slot.

        Returns the runner id, or None when no runner has a slot. Idempotent:
        a build already handed out returns its runner. Raises
        ``FailedPrecondition`` for a build that is no longer queued.
        """
        async with self.db.transaction() as conn:
            build = await self.builds.get_in(conn, None, build_id, lock=True)
            if build.status != BuildStatus.QUEUED:
                raise FailedPrecondition(
                    f"build is {build.status.value}; only a queued build starts"
                )
            if build.runner_id:
                return build.runner_id
            runner_id = await self.runners.pick_free(conn, self.settings.runner_lost_after)
            if runner_id is None:
                return None
            await conn.execute(
                "UPDATE builds SET runner_id = %s, assigned_at = now() WHERE id = %s",
                (runner_id, build_id),
            )
            await self.builds.arm(
                conn,
                build_id,
                "startup",
                now() + timedelta(seconds=self.settings.startup_deadline),
            )
            await conn.execute("SELECT pg_notify('conveyor_runner', %s)", (runner_id,))
        self.notifier.publish_local("conveyor_runner", runner_id)
        return runner_id

    async def start_many(self, build_ids: list[str]) -> dict[str, str]:
        """Hand queued builds to live runners with free slots, least busy
        first, in one transaction; return {build id: runner id} for those
        started. Builds no longer queued, already handed out, or locked by a
        concurrent start are left out; so are builds past the free slots."""
        started: dict[str, str] = {}
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "SELECT id FROM builds WHERE id = ANY(%s::uuid[]) AND status = 'queued'"
                " AND runner_id IS NULL ORDER BY created_at FOR NO KEY UPDATE SKIP LOCKED",
                (build_ids,),
            )
            queued = [str(r[0]) for r in await cur.fetchall()]
            if not queued:
                return started
            free = await self.runners.lock_free(conn, self.settings.runner_lost_after)
            for build_id in queued:
                if not free:
                    break
                runner_id = max(free, key=lambda r: free[r])
                started[build_id] = runner_id
                free[runner_id] -= 1
                if free[runner_id] == 0:
                    del free[runner_id]
            if not started:
                return started
            ids, runners = list(started), list(started.values())
            await conn.execute(
                "UPDATE builds b SET runner_id = x.runner_id, assigned_at = now()"
                " FROM unnest(%s::uuid[], %s::uuid[]) AS x(id, runner_id) WHERE b.id = x.id",
                (ids, runners),
            )
            deadline = now() + timedelta(seconds=self.settings.startup_deadline)
            await conn.execute(
                "INSERT INTO alarms (build_id, kind, fire_at)"
                " SELECT id, 'startup', %s FROM unnest(%s::uuid[]) AS id"
                " ON CONFLICT (build_id, kind) DO UPDATE SET fire_at = excluded.fire_at",
                (deadline, ids),
            )
            for runner_id in set(runners):
                await conn.execute("SELECT pg_notify('conveyor_runner', %s)", (runner_id,))
        for runner_id in set(started.values()):
            self.notifier.publish_local("conveyor_runner", runner_id)
        return started

    async def dispatch(
        self, runner_id: str, session_id: str
    ) -> tuple[list[AssignmentData], list[tuple[str, str, int]]] | None:
        """Take this runner's undelivered assignments and cancels for the
        stream ``session_id``.

        Returns (assignments, cancels as (build id, reason, grace seconds)),
        or None when a newer stream of the runner superseded this one (the
        caller must end its stream). Each build gets a fresh token here, sent
        only in its assignment.
        """
        assignments: list[AssignmentData] = []
        cancels: list[tuple[str, str, int]] = []
        async with self.db.transaction() as conn:
            if await self.runners.current_session(conn, runner_id) != session_id:
                return None
            # NO KEY UPDATE: a row some insert merely references (a foreign
            # key's KEY SHARE lock: alarms, log chunks, commit-status rows)
            # must not be skipped, or its assignment waits for the recheck.
            cur = await conn.execute(
                "SELECT id FROM builds WHERE runner_id = %s AND status = 'queued'"
                " AND dispatched_at IS NULL ORDER BY created_at FOR NO KEY UPDATE SKIP LOCKED",
                (runner_id,),
            )
            ids = [str(r[0]) for r in await cur.fetchall()]
            cur = await conn.execute(
                "SELECT build_id, number, fork FROM pull_request_builds"
                " WHERE build_id = ANY(%s::uuid[])",
                (ids,),
            )
            rows = await cur.fetchall()
            requests = {str(r[0]): int(r[1]) for r in rows}
            forks = {str(r[0]) for r in rows if r[2]}
            projects: dict[str, Project] = {}
            envs: dict[str, tuple[EnvVar, ...]] = {}
            tokens: list[str] = []
            for build in await self.builds.get_many_in(conn, ids):
                if build.project_id not in projects:
                    projects[build.project_id] = await self.projects.get_in(
                        conn, None, build.project_id
                    )
                    # FORGE_TOKEN is for the control plane's status reports;
                    # builds (pull-request previews from forks among them)
                    # never see it.
                    envs[build.project_id] = tuple(
                        v
                        for v in await self.env.for_build(conn, build.project_id)
                        if v.name != FORGE_TOKEN
                    )
                project = projects[build.project_id]
                env = envs[build.project_id]
                if build.id in forks and not project.fork_secrets:
                    # A fork's pull request runs code its author wrote: no
                    # secrets, and no step that deploys.
                    project = without_fork_privileges(project)
                    env = tuple(v for v in env if not v.secret)
                token = f"cvb_{secrets.token_urlsafe(32)}"
                tokens.append(token)
                plan = step_plan(project, build.production)
                assignments.append(
                    AssignmentData(
                        build=build,
                        token=token,
                        project=project,
                        step_names=tuple(n for n, _ in plan),
                        step_commands=tuple(c for _, c in plan),
                        run_timeout=project.run_timeout_seconds,
                        env=env,
                        pull_request=requests.get(build.id),
                    )
                )
            if assignments:
                await conn.execute(
                    "UPDATE builds b SET dispatched_at = now(), token_hash = x.hash"
                    " FROM unnest(%s::uuid[], %s::bytea[]) AS x(id, hash) WHERE b.id = x.id",
                    ([a.build.id for a in assignments], [hash_token(t) for t in tokens]),
                )
            cur = await conn.execute(
                "UPDATE builds SET cancel_sent_at = now() WHERE runner_id = %s"
                " AND cancel_requested_at IS NOT NULL AND cancel_sent_at IS NULL"
                " AND dispatched_at IS NOT NULL RETURNING id, cancel_reason",
                (runner_id,),
            )
            cancels = [
                (str(r[0]), r[1] or "", self.settings.kill_grace) for r in await cur.fetchall()
            ]
        return assignments, cancels

    async def refused(self, build_id: str, runner_id: str, reason: str) -> None:
        """The runner could not take the build: put it back in the queue."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE builds SET runner_id = NULL, assigned_at = NULL, dispatched_at = NULL,"
                " token_hash = NULL WHERE id = %s AND runner_id = %s AND status = 'queued'",
                (build_id, runner_id),
            )
            await self.builds.disarm(conn, build_id, ["startup"])
            await conn.execute("SELECT pg_notify('conveyor_queue', %s)", (build_id,))
        log.info("runner handed build back: %s", reason, extra={"build_id": build_id})
        self.notifier.publish_local("conveyor_queue", build_id)

    # --- reports from the runner -----------------------------------------

    async def check_build_token(self, build_id: str, token: str) -> None:
        """Raise ``PermissionDenied`` unless ``token`` is this build's live token."""
        async with self.db.connection() as conn:
            cur = await conn.execute("SELECT token_hash FROM builds WHERE id = %s", (build_id,))
            row = await cur.fetchone()
        if (
            row is None
            or row[0] is None
            or not secrets.compare_digest(bytes(row[0]), hash_token(token))
        ):
            raise PermissionDenied("the build token is not valid for this build (or it ended)")

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
        async with self.db.transaction() as conn:
            build = await self.builds.get_in(conn, None, build_id, lock=True)
            if build.status.final:
                raise FailedPrecondition(f"build is {build.status.value}; it takes no more reports")
            stopping: bool | None = None
            for step in steps or []:
                step_status = step.status
                if step_status == StepStatus.FAILED and _killed(step.exit_code):
                    if stopping is None:
                        stopping = await self._stop_requested(conn, build_id)
                    if stopping:
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
            if status.final:
                status, reason = await self._final_for(conn, build_id, status, reason)
            if status == BuildStatus.SUCCEEDED and not reason:
                # Every final state has a reason, success included.
                reason = "every step succeeded"
            check_transition(build.status, status)
            await self._write(conn, build, status, reason, at)
        self._after(build, status, at)
        return status

    async def _stop_requested(self, conn: Conn, build_id: str) -> bool:
        """Whether we asked the build's runner to stop it (cancel, deadline)."""
        cur = await conn.execute(
            "SELECT 1 FROM builds WHERE id = %s AND cancel_requested_at IS NOT NULL", (build_id,)
        )
        return await cur.fetchone() is not None

    async def _final_for(
        self, conn: Conn, build_id: str, status: BuildStatus, reason: str
    ) -> tuple[BuildStatus, str]:
        """A job stopped because we asked ends in the state we asked for."""
        cur = await conn.execute(
            "SELECT cancel_status, cancel_reason FROM builds WHERE id = %s"
            " AND cancel_requested_at IS NOT NULL",
            (build_id,),
        )
        row = await cur.fetchone()
        if row and row[0] and status in (BuildStatus.CANCELED, BuildStatus.FAILED):
            return BuildStatus(row[0]), row[1] or reason
        return status, reason

    async def _write(
        self, conn: Conn, build: Build, status: BuildStatus, reason: str, at: datetime
    ) -> None:
        await self.builds.set_status(conn, build.id, status, at=at, reason=reason)
        if status == BuildStatus.INITIALIZING or (
            status == BuildStatus.RUNNING and build.status == BuildStatus.QUEUED
        ):
            await self.builds.disarm(conn, build.id, ["startup"])
            cur = await conn.execute(
                "SELECT run_timeout_seconds FROM projects WHERE id = %s", (build.project_id,)
            )
            row = await cur.fetchone()
            timeout = min(int(row[0]) if row else 1200, self.settings.max_run_timeout)
            await self.builds.arm(conn, build.id, "run", at + timedelta(seconds=timeout))
        if status.final:
            await self.builds.close_open_steps(conn, build.id, at)
            await self.builds.disarm(conn, build.id, ["startup", "run", "kill"])
        await conn.execute(
            "SELECT pg_notify('conveyor_build', %s)", (f"{build.id}:{status.value}",)
        )

    def _after(self, build: Build, status: BuildStatus, at: datetime) -> None:
        extra = {
            "build_id": build.id,
            "project_id": build.project_id,
            "account_id": build.account_id,
        }
        log.info("build %s", status.value, extra=extra)
        if status == BuildStatus.INITIALIZING or (
            status == BuildStatus.RUNNING and build.status == BuildStatus.QUEUED
        ):
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

    async def warn(self, build_id: str, warnings: list[str]) -> None:
        """Add warnings ``builds show`` prints (the same text once). Raises
        ``NotFound`` for an unknown build and ``Unavailable`` unchanged."""
        async with self.db.transaction() as conn:
            await self.builds.get_in(conn, None, build_id)
            await self.builds.add_warnings(conn, build_id, warnings)

    # --- cancel, deadlines, lost runners ---------------------------------

    async def cancel(self, account_id: str | None, build_id: str, by: str) -> Build:
        """Cancel a build: at once when no runner has it yet, otherwise ask its
        runner to stop the job. Raises ``FailedPrecondition`` for a final build."""
        reason = f"canceled by {by}"
        async with self.db.transaction() as conn:
            build = await self.builds.get_in(conn, account_id, build_id, lock=True)
            check_transition(build.status, BuildStatus.CANCELED)
            immediate = await self._request_stop(conn, build.id, BuildStatus.CANCELED, reason)
        if immediate:
            self._after(build, BuildStatus.CANCELED, now())
        return await self.builds.get(account_id, build_id)

    async def _request_stop(
        self, conn: Conn, build_id: str, status: BuildStatus, reason: str
    ) -> bool:
        """Stop a build, ending in ``status``. Returns True when it ended at
        once (no runner had it yet)."""
        build = await self.builds.get_in(conn, None, build_id, lock=True)
        if build.status.final:
            return False
        cur = await conn.execute("SELECT dispatched_at FROM builds WHERE id = %s", (build_id,))
        row = await cur.fetchone()
        dispatched = bool(row and row[0])
        if not dispatched:
            await self._write(conn, build, status, reason, now())
            return True
        await conn.execute(
            "UPDATE builds SET cancel_requested_at = coalesce(cancel_requested_at, now()),"
            " cancel_status = coalesce(cancel_status, %s),"
            " cancel_reason = coalesce(cancel_reason, %s), cancel_sent_at = NULL"
            " WHERE id = %s",
            (status.value, reason, build_id),
        )
        confirm = self.settings.kill_grace + self.settings.stop_confirm
        await self.builds.arm(conn, build_id, "kill", now() + timedelta(seconds=confirm))
        if build.runner_id:
            await conn.execute("SELECT pg_notify('conveyor_runner', %s)", (build.runner_id,))
            self.notifier.publish_local("conveyor_runner", build.runner_id)
        return False

    async def fire_alarms(self, limit: int = 100) -> int:
        """Fire due alarms (startup, run, kill deadlines); return how many.
        Firing twice is harmless: each checks the build's current state."""
        fired: list[tuple[Build, BuildStatus]] = []
        async with self.db.transaction() as conn:
            for build_id, kind in await self.builds.due_alarms(conn, limit):
                await self.builds.disarm(conn, build_id, [kind])
                build = await self.builds.get_in(conn, None, build_id, lock=True)
                self.metrics.alarms_fired.labels(kind).inc()
                if build.status.final:
                    continue
                log.info("%s deadline fired", kind, extra={"build_id": build_id})
                if kind == "startup" and build.status == BuildStatus.QUEUED:
                    await self._write(conn, build, BuildStatus.ERRORED, "startup deadline", now())
                    fired.append((build, BuildStatus.ERRORED))
                    await self._tell_runner_stop(conn, build, "startup deadline")
                elif kind == "run":
                    # The configured limit, not the time the alarm fired at:
                    # after an outage the two differ (issue 16).
                    cur = await conn.execute(
                        "SELECT run_timeout_seconds FROM projects WHERE id = %s",
                        (build.project_id,),
                    )
                    row = await cur.fetchone()
                    limit = min(int(row[0]) if row else 1200, self.settings.max_run_timeout)
                    ran = (now() - (build.started_at or build.created_at)).total_seconds()
                    reason = run_deadline_reason(limit, ran - limit, self.settings.alarm_poll)
                    await self._request_stop(conn, build_id, BuildStatus.TIMED_OUT, reason)
                elif kind == "kill":
                    cur = await conn.execute(
                        "SELECT cancel_status, cancel_reason FROM builds WHERE id = %s",
                        (build_id,),
                    )
                    row = await cur.fetchone()
                    status = BuildStatus(row[0]) if row and row[0] else BuildStatus.ERRORED
                    reason = row[1] if row and row[1] else "stopped"
                    reason += " (the runner did not confirm the stop)"
                    if is_allowed(build.status, status):
                        await self._write(conn, build, status, reason, now())
                        fired.append((build, status))
        for build, status in fired:
            self._after(build, status, now())
        return len(fired)

    async def _tell_runner_stop(self, conn: Conn, build: Build, reason: str) -> None:
        if build.runner_id:
            await conn.execute(
                "UPDATE builds SET cancel_requested_at = now(), cancel_reason = %s,"
                " cancel_sent_at = NULL WHERE id = %s",
                (reason, build.id),
            )
            await conn.execute("SELECT pg_notify('conveyor_runner', %s)", (build.runner_id,))

    async def reap_lost_runners(self) -> int:
        """Error the running builds of runners silent past the bound; put their
        accepted-but-not-started builds back in the queue. Returns builds touched.

        Reaps nothing until this process has been able to hear runners for
        the whole bound (after its start, or after the database came back);
        raises the database's errors (``Unavailable``) unchanged."""
        try:
            return await self._reap_lost_runners()
        except Exception:
            self._hearing_since = None
            raise

    async def _reap_lost_runners(self) -> int:
        if self._hearing_since is None:
            self._hearing_since = time.monotonic()
        if time.monotonic() - self._hearing_since < self.settings.runner_lost_after:
            return 0
        touched: list[tuple[Build, BuildStatus]] = []
        requeued = 0
        async with self.db.transaction() as conn:
            for runner_id in await self.runners.lost(conn, self.settings.runner_lost_after):
                self.metrics.runners_lost.inc()
                log.warning("runner %s lost", runner_id)
                await conn.execute(
                    "UPDATE runners SET connected = false WHERE id = %s", (runner_id,)
                )
                cur = await conn.execute(
                    "SELECT id FROM builds WHERE runner_id = %s"
                    " AND status IN ('queued', 'initializing', 'running') FOR UPDATE",
                    (runner_id,),
                )
                for (bid,) in await cur.fetchall():
                    build = await self.builds.get_in(conn, None, str(bid))
                    if build.status == BuildStatus.QUEUED:
                        ended = await self._requeue_in(conn, build)
                        if ended is not None:
                            touched.append((build, ended))
                            continue
                        log.info("runner lost; build back in the queue", extra={"build_id": bid})
                        requeued += 1
                    else:
                        await self._write(conn, build, BuildStatus.ERRORED, "runner lost", now())
                        touched.append((build, BuildStatus.ERRORED))
            if requeued:
                await conn.execute("SELECT pg_notify('conveyor_queue', '')")
        for build, status in touched:
            self._after(build, status, now())
        if requeued:
            self.notifier.publish_local("conveyor_queue", None)
        return len(touched) + requeued

    async def _requeue_in(self, conn: Conn, build: Build) -> BuildStatus | None:
        """Take a queued build (locked by the caller) back from its runner:
        it never started. A build someone asked to stop ends instead, in the
        state asked for; that state is returned (None: requeued), and the
        caller fires ``_after`` for it after the commit."""
        cur = await conn.execute(
            "SELECT cancel_status, cancel_reason FROM builds WHERE id = %s"
            " AND cancel_requested_at IS NOT NULL",
            (build.id,),
        )
        row = await cur.fetchone()
        if row is not None:
            status = BuildStatus(row[0]) if row[0] else BuildStatus.CANCELED
            await self._write(conn, build, status, row[1] or "stopped", now())
            return status
        await conn.execute(
            "UPDATE builds SET runner_id = NULL, assigned_at = NULL, dispatched_at = NULL,"
            " token_hash = NULL WHERE id = %s AND status = 'queued'",
            (build.id,),
        )
        await self.builds.disarm(conn, build.id, ["startup"])
        return None

    async def forget_missing(self, runner_id: str, running: set[str]) -> None:
        """Reconcile with a runner that (re)connected saying it runs ``running``.

        Builds we handed it that it does not have: a queued one (the
        assignment was lost on the way, or the runner restarted before
        starting it) goes back to the queue; a started one errored with the
        runner. Stops it may have missed while away are sent again, and a
        build it still runs that ended here meanwhile is stopped.
        """
        ids = [b for b in running if is_uuid(b)]
        errored: list[str] = []
        ended: list[tuple[Build, BuildStatus]] = []
        requeued = 0
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "SELECT id, status FROM builds WHERE runner_id = %s AND dispatched_at IS NOT NULL"
                " AND status IN ('queued', 'initializing', 'running') FOR UPDATE",
                (runner_id,),
            )
            for bid, status in await cur.fetchall():
                if str(bid) in running:
                    continue
                if status == BuildStatus.QUEUED.value:
                    build = await self.builds.get_in(conn, None, str(bid))
                    final = await self._requeue_in(conn, build)
                    if final is not None:
                        ended.append((build, final))
                        continue
                    log.info(
                        "runner came back without the build; requeued", extra={"build_id": str(bid)}
                    )
                    requeued += 1
                else:
                    errored.append(str(bid))
            await conn.execute(
                "UPDATE builds SET cancel_requested_at = coalesce(cancel_requested_at, now()),"
                " cancel_reason = coalesce(cancel_reason, 'the build already ended'),"
                " cancel_sent_at = NULL WHERE runner_id = %s AND id = ANY(%s::uuid[])"
                " AND (cancel_requested_at IS NOT NULL"
                "      OR status NOT IN ('queued', 'initializing', 'running'))",
                (runner_id, ids),
            )
            if requeued:
                await conn.execute("SELECT pg_notify('conveyor_queue', '')")
        for build, final in ended:
            self._after(build, final, now())
        if requeued:
            self.notifier.publish_local("conveyor_queue", None)
        for build_id in errored:
            try:
                await self.report(build_id, BuildStatus.ERRORED, reason="runner lost (restarted)")
            except FailedPrecondition:
                pass
