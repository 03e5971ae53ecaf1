"""Projects as a caller sees them: the list with each last build, one
project, its variables; creating, changing and deleting one, its webhook
secret and its build cache. Each change is one transaction with its audit
row."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from control.domain.build import Build
from control.domain.project import Project, ProjectSettings
from control.errors import InvalidArgument
from control.forge.remote import RemoteReader
from control.services.access import require
from control.storage.accounts import Principal
from control.storage.audit import AuditLog
from control.storage.builds import BuildStore
from control.storage.db import Database
from control.storage.env import EnvStore, EnvVar
from control.storage.projects import UPDATABLE, ProjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectSummary:
    """A project and its newest build (``None`` before the first)."""

    project: Project
    last_build: Build | None


class ProjectService:
    """The caller's projects. Raises ``NotFound`` for a project that is
    missing or another account's, ``PermissionDenied`` for a missing scope,
    ``InvalidArgument`` naming the wrong setting, ``AlreadyExists`` for a
    taken name and ``FailedPrecondition`` for a state that forbids the
    change. ``max_run_timeout`` (seconds) and ``forge_api_urls`` are the
    operator's limits every setting is validated against."""

    def __init__(
        self,
        projects: ProjectStore,
        builds: BuildStore,
        env: EnvStore,
        *,
        reader: RemoteReader,
        db: Database,
        audit: AuditLog,
        max_run_timeout: int,
        forge_api_urls: frozenset[str] = frozenset(),
    ) -> None:
        self.reader = reader
        self.projects = projects
        self.builds = builds
        self.env_store = env
        self.db = db
        self.audit = audit
        self.max_run_timeout = max_run_timeout
        self.forge_api_urls = forge_api_urls

    async def list(self, caller: Principal) -> list[ProjectSummary]:
        """The caller's projects by name, each with its newest build."""
        account = require(caller, "read")
        projects = await self.projects.list_for(account)
        last = await self.builds.last_per_project(account)
        return [ProjectSummary(p, last.get(p.id)) for p in projects]

    async def list_projects(self, caller: Principal) -> builtins.list[Project]:
        """The caller's projects by name, without their builds (for edges
        that show none: one query fewer)."""
        return await self.projects.list_for(require(caller, "read"))

    async def get(self, caller: Principal, ref: str) -> Project:
        """One project by id or name."""
        return await self.projects.get(require(caller, "read"), ref)

    async def env(self, caller: Principal, ref: str) -> builtins.list[EnvVar]:
        """The project's variables; secret values are blank, never read."""
        project = await self.get(caller, ref)
        return await self.env_store.list_for(project.id)

    async def check_repository(self, account_id: str, repo_url: str) -> None:
        """Before a project names ``repo_url`` (create, or an update of it):
        raise ``InvalidArgument("repo_url", ...)`` for a local path when the
        operator does not allow local repositories, or for one this host can
        see that builds could not read (``RemoteReader.check_local``). A
        network URL is checked when a branch head is read, not here: its
        server may be down now and fine later."""
        await self.reader.check_local(account_id, repo_url)

    async def create(self, caller: Principal, settings: ProjectSettings) -> Project:
        """Create a project of the caller's account; the answer holds its
        webhook secret, which the caller shows once."""
        account = require(caller, "write")
        settings.validate(self.max_run_timeout, self.forge_api_urls)
        await self.check_repository(account, settings.repo_url)
        async with self.db.transaction() as conn:
            project = await self.projects.create(conn, account, settings)
            await self.audit.record(
                conn, account, caller.name, "project.create", f"project {project.name}",
                f"repo_url={project.repo_url} fork_secrets={_on_off(project.fork_secrets)}",
            )  # fmt: skip
        log.info("project created", extra={"project_id": project.id})
        return project

    async def update(self, caller: Principal, ref: str, values: Mapping[str, Any]) -> Project:
        """Set the settings named in ``values`` (names of ``ProjectSettings``,
        lists as tuples) on project ``ref`` and validate the result as a
        whole. The caller must name at least one setting; an unknown name is
        ``InvalidArgument`` naming it."""
        account = require(caller, "write")
        unknown = sorted(set(values) - UPDATABLE)
        if unknown:
            raise InvalidArgument(unknown[0], "is not a setting that can be updated")
        current = await self.projects.get(account, ref)
        base = ProjectSettings(
            **{f.name: getattr(current, f.name) for f in fields(ProjectSettings)}
        )
        updated = replace(base, **values)
        updated.validate(self.max_run_timeout, self.forge_api_urls)
        if "repo_url" in values:
            # Outside the transaction: it may read the repository.
            await self.check_repository(account, updated.repo_url)
        changes = {k: v for k, v in asdict(updated).items() if k in values}
        async with self.db.transaction() as conn:
            project = await self.projects.update(conn, account, current.id, changes)
            details = "changed=" + ",".join(sorted(changes))
            if "fork_secrets" in changes:
                details += f" fork_secrets={_on_off(project.fork_secrets)}"
            await self.audit.record(
                conn, account, caller.name, "project.update", f"project {project.name}", details
            )
        return project

    async def delete(self, caller: Principal, ref: str) -> Project:
        """Delete project ``ref`` with its builds, variables and hooks, and
        return it as it was; ``FailedPrecondition`` while a build of it
        runs."""
        account = require(caller, "write")
        async with self.db.transaction() as conn:
            project = await self.projects.delete(conn, account, ref)
            await self.audit.record(
                conn, account, caller.name, "project.delete", f"project {project.name}"
            )
        log.info("project deleted", extra={"project_id": project.id})
        return project

    async def rotate_webhook_secret(self, caller: Principal, ref: str) -> Project:
        """Give project ``ref`` a new webhook secret (admin scope) and return
        the project with it; the old secret stops verifying at commit."""
        account = require(caller, "admin")
        async with self.db.transaction() as conn:
            current = await self.projects.get_in(conn, account, ref)
            project = await self.projects.rotate_webhook_secret(conn, account, current.id)
            await self.audit.record(
                conn, account, caller.name, "project.rotate_webhook_secret",
                f"project {project.name}",
            )  # fmt: skip
        log.info("webhook secret rotated", extra={"project_id": project.id})
        return project

    async def purge_cache(self, caller: Principal, ref: str) -> int:
        """Start a new build-cache generation of project ``ref`` and return
        it: builds dispatched afterwards restore nothing older."""
        account = require(caller, "write")
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(conn, account, ref)
            generation = await self.projects.purge_cache(conn, account, project.id)
            await self.audit.record(
                conn, account, caller.name, "cache.purge", f"project {project.name}",
                f"generation={generation}",
            )  # fmt: skip
        log.info("build cache purged: generation %d", generation, extra={"project_id": project.id})
        return generation


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"
