"""Queueing a build, and superseding the branch's older ones."""

from __future__ import annotations

import logging
from datetime import datetime

from control.builds.dispatch import step_plan
from control.builds.transitions import Queued, Transitions, now
from control.domain.build import BuildStatus
from control.domain.project import Project, local_repository_path
from control.errors import FailedPrecondition
from control.storage.assignments import notify
from control.storage.db import Conn

log = logging.getLogger(__name__)


class Queueing:
    def __init__(self, transitions: Transitions, *, local_repositories: bool) -> None:
        self.transitions = transitions
        # Whether projects may build local paths (CONVEYOR_LOCAL_REPOSITORIES).
        self.local_repositories = local_repositories
        self.builds = transitions.builds
        self.assignments = transitions.assignments

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
        """Queue a build; supersede the branch's builds no runner was sent
        yet (and, with ``cancel_in_progress``, stop its running ones).
        Returns the build id; raises ``FailedPrecondition`` for a project
        naming a local path on a control plane that does not allow them
        (one created before the operator denied them).

        With ``conn`` the caller commits; it must come from
        ``Transitions.transaction()`` (else ``ValueError``), so that nobody
        hears of the build before it commits."""
        if conn is None:
            async with self.transitions.transaction() as own:
                return await self.queue(
                    project,
                    branch=branch,
                    commit_sha=commit_sha,
                    trigger=trigger,
                    production=production,
                    retry_of=retry_of,
                    received_at=received_at,
                    conn=own,
                )
        self.transitions.require(conn)
        if not self.local_repositories and local_repository_path(project.repo_url) is not None:
            raise FailedPrecondition(
                f"project {project.name} builds a local path, which this control plane does not"
                " allow (CONVEYOR_LOCAL_REPOSITORIES=deny): set its repo_url to an https, ssh"
                " or git URL"
            )
        if production is None:
            production = branch == project.production_branch
        build_id = await self.builds.insert(
            conn,
            project_id=project.id,
            account_id=project.account_id,
            branch=branch,
            commit_sha=commit_sha,
            trigger=trigger,
            production=production,
            step_names=["clone"] + [name for name, _ in step_plan(project, production)],
            retry_of=retry_of,
            received_at=received_at,
        )
        self.transitions.record(conn, Queued(build_id, trigger))
        if retry_of is not None:
            await self.assignments.link_retry(conn, build_id, retry_of)
        if trigger != "retry":
            await self._supersede(conn, project, branch, build_id)
        await notify(conn, "conveyor_queue", build_id)
        log.info("build queued", extra={"build_id": build_id, "project_id": project.id})
        return build_id

    async def _supersede(self, conn: Conn, project: Project, branch: str, build_id: str) -> None:
        at = now()
        reason = f"superseded by build {build_id}"
        for old in await self.builds.undispatched_on_branch(conn, project.id, branch, build_id):
            await self.transitions.move(conn, old, BuildStatus.SUPERSEDED, reason, at)
        if project.cancel_in_progress:
            for old_id in await self.builds.active_on_branch(conn, project.id, branch):
                if old_id != build_id:
                    old = await self.builds.get_in(conn, None, old_id, lock=True)
                    await self.transitions.stop(
                        conn, old, BuildStatus.CANCELED, f"canceled: {reason}"
                    )
