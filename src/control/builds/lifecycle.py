"""The build lifecycle: the parts that own build state, put together.

Each part lives in its own module of ``builds/`` and changes a build's
status only through ``Transitions.move`` (see ``transitions.py``):

- ``transitions``: the one write, events after commit, reports, cancel;
- ``queueing``: a new build, superseding the branch's older ones;
- ``placement``: queued builds onto runners' free slots;
- ``dispatch``: what a runner's stream sends, and builds handed back;
- ``alarms``: startup, run and kill deadlines (``deadlines``: their reasons);
- ``lost_runners``: silent runners and runners that come back.

``Lifecycle`` is what the servicers, webhooks and the scheduler hold; its
methods are the parts' entry points under the names callers use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

from control.builds.alarms import Alarms
from control.builds.dispatch import AssignmentData, Dispatch, Stop, step_plan
from control.builds.lost_runners import LostRunners
from control.builds.placement import Placement
from control.builds.queueing import Queueing
from control.builds.transitions import StepReport, Transitions, now
from control.config import LifecycleSettings
from control.domain.build import Build, BuildStatus
from control.domain.project import Project
from control.metrics import ControlMetrics
from control.storage.assignments import AssignmentStore
from control.storage.builds import BuildStore
from control.storage.db import Conn, Database
from control.storage.env import EnvStore
from control.storage.notify import Notifier
from control.storage.projects import ProjectStore
from control.storage.runners import RunnerStore

__all__ = ["AssignmentData", "Lifecycle", "StepReport", "Stop", "now", "step_plan"]


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
        *,
        local_repositories: bool,
    ) -> None:
        self.db = db
        self.builds = builds
        self.projects = projects
        self.runners = runners
        self.env = env
        self.settings = settings
        self.transitions = Transitions(db, builds, AssignmentStore(), notifier, metrics, settings)
        self.queueing = Queueing(self.transitions, local_repositories=local_repositories)
        self.placement = Placement(self.transitions, runners, settings)
        self.dispatcher = Dispatch(self.transitions, projects, runners, env, settings)
        self.alarms = Alarms(self.transitions, metrics)
        self.lost_runners = LostRunners(self.transitions, runners, metrics, settings)

    @property
    def listeners(self) -> list[Callable[[str], None]]:
        """Called with a build id after every committed change of it."""
        return self.transitions.listeners

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """See ``Transitions.transaction``: for ``queue(conn=...)``."""
        async with self.transitions.transaction() as conn:
            yield conn

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
        """See ``Queueing.queue``."""
        return await self.queueing.queue(
            project,
            branch=branch,
            commit_sha=commit_sha,
            trigger=trigger,
            production=production,
            retry_of=retry_of,
            received_at=received_at,
            conn=conn,
        )

    async def start(self, build_id: str) -> str | None:
        """See ``Placement.place_one``."""
        return await self.placement.place_one(build_id)

    async def start_many(self, build_ids: list[str]) -> dict[str, str]:
        """See ``Placement.place``."""
        return await self.placement.place(build_ids)

    async def dispatch(
        self, runner_id: str, session_id: str
    ) -> tuple[list[AssignmentData], list[Stop]] | None:
        """See ``Dispatch.take``."""
        return await self.dispatcher.take(runner_id, session_id)

    async def refused(self, build_id: str, runner_id: str, reason: str) -> None:
        """See ``Dispatch.refused``."""
        await self.dispatcher.refused(build_id, runner_id, reason)

    async def check_build_token(self, build_id: str, token: str) -> None:
        """See ``Dispatch.check_build_token``."""
        await self.dispatcher.check_build_token(build_id, token)

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
        """See ``Transitions.report``."""
        return await self.transitions.report(
            build_id, status, reason=reason, steps=steps, at=at, warnings=warnings
        )

    async def warn(self, build_id: str, warnings: list[str]) -> None:
        """See ``Transitions.warn``."""
        await self.transitions.warn(build_id, warnings)

    async def cancel(self, account_id: str | None, build_id: str, by: str) -> Build:
        """See ``Transitions.cancel``."""
        return await self.transitions.cancel(account_id, build_id, by)

    async def fire_alarms(self, limit: int = 100) -> int:
        """See ``Alarms.fire``."""
        return await self.alarms.fire(limit)

    async def reap_lost_runners(self) -> int:
        """See ``LostRunners.reap``."""
        return await self.lost_runners.reap()

    async def forget_missing(self, runner_id: str, running: set[str]) -> None:
        """See ``LostRunners.forget_missing``."""
        await self.lost_runners.forget_missing(runner_id, running)
