"""Dispatch: what a runner's stream sends — each assigned build with its
steps, variables, decrypted secrets and a fresh build token — and builds a
runner hands back."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import NamedTuple

from control.builds.transitions import QueueChanged, Transitions
from control.config import LifecycleSettings
from control.domain.build import Build
from control.domain.env import FORGE_TOKEN
from control.domain.project import Project, without_fork_privileges
from control.storage.assignments import notify
from control.storage.env import EnvStore, EnvVar
from control.storage.projects import ProjectStore
from control.storage.runners import RunnerStore

log = logging.getLogger(__name__)


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


class Stop(NamedTuple):
    """A stop to send: the build, why, and the seconds between SIGTERM and
    SIGKILL."""

    build_id: str
    reason: str
    grace: int


def step_plan(project: Project, production: bool) -> list[tuple[str, str]]:
    """The (name, command) steps of a build after the clone."""
    steps = []
    if project.build_command.strip():
        steps.append(("build", project.build_command))
    last = project.deploy_command if production else project.preview_command
    if last.strip():
        steps.append(("deploy" if production else "preview", last))
    return steps


class Dispatch:
    def __init__(
        self,
        transitions: Transitions,
        projects: ProjectStore,
        runners: RunnerStore,
        env: EnvStore,
        settings: LifecycleSettings,
    ) -> None:
        self.transitions = transitions
        self.db = transitions.db
        self.builds = transitions.builds
        self.assignments = transitions.assignments
        self.projects = projects
        self.runners = runners
        self.env = env
        self.settings = settings

    async def take(
        self, runner_id: str, session_id: str
    ) -> tuple[list[AssignmentData], list[Stop]] | None:
        """Take this runner's undelivered assignments and stops for the
        stream ``session_id``.

        Returns (assignments, stops), or None when a newer stream of the
        runner superseded this one (the caller must end its stream). Each
        build gets a fresh token here, sent only in its assignment.
        """
        assignments: list[AssignmentData] = []
        async with self.db.transaction() as conn:
            if await self.runners.current_session(conn, runner_id) != session_id:
                return None
            ids = await self.assignments.lock_undispatched(conn, runner_id)
            requests = await self.assignments.pull_requests(conn, ids)
            projects: dict[str, Project] = {}
            envs: dict[str, tuple[EnvVar, ...]] = {}
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
                request = requests.get(build.id)
                if request and request.fork and not project.fork_secrets:
                    # A fork's pull request runs code its author wrote: no
                    # secrets, and no step that deploys.
                    project = without_fork_privileges(project)
                    env = tuple(v for v in env if not v.secret)
                plan = step_plan(project, build.production)
                assignments.append(
                    AssignmentData(
                        build=build,
                        token=f"cvb_{secrets.token_urlsafe(32)}",
                        project=project,
                        step_names=tuple(n for n, _ in plan),
                        step_commands=tuple(c for _, c in plan),
                        run_timeout=project.run_timeout_seconds,
                        env=env,
                        pull_request=request.number if request else None,
                    )
                )
            if assignments:
                await self.assignments.mark_dispatched(
                    conn, {a.build.id: a.token for a in assignments}
                )
            stops = [
                Stop(stop.build_id, stop.reason, self.settings.kill_grace)
                for stop in await self.assignments.take_stops(conn, runner_id)
            ]
        return assignments, stops

    async def refused(self, build_id: str, runner_id: str, reason: str) -> None:
        """The runner could not take the build: put it back in the queue."""
        async with self.transitions.transaction() as conn:
            await self.assignments.unassign(conn, build_id, runner_id)
            await self.builds.disarm(conn, build_id, ["startup"])
            await notify(conn, "conveyor_queue", build_id)
            self.transitions.record(conn, QueueChanged())
        log.info("runner handed build back: %s", reason, extra={"build_id": build_id})
