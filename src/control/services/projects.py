"""Projects as a caller sees them: the list with each last build, one
project, its variables."""

from __future__ import annotations

import builtins
from dataclasses import dataclass

from control.domain.build import Build
from control.domain.project import Project
from control.forge.remote import RemoteReader
from control.services.access import require
from control.storage.accounts import Principal
from control.storage.builds import BuildStore
from control.storage.env import EnvStore, EnvVar
from control.storage.projects import ProjectStore


@dataclass(frozen=True)
class ProjectSummary:
    """A project and its newest build (``None`` before the first)."""

    project: Project
    last_build: Build | None


class ProjectService:
    """Read access to the caller's projects. Raises ``NotFound`` for a
    project that is missing or another account's, ``PermissionDenied`` for a
    missing scope."""

    def __init__(
        self, projects: ProjectStore, builds: BuildStore, env: EnvStore, *, reader: RemoteReader
    ) -> None:
        self.reader = reader
        self.projects = projects
        self.builds = builds
        self.env_store = env

    async def list(self, caller: Principal) -> list[ProjectSummary]:
        """The caller's projects by name, each with its newest build."""
        account = require(caller, "read")
        projects = await self.projects.list_for(account)
        last = await self.builds.last_per_project(account)
        return [ProjectSummary(p, last.get(p.id)) for p in projects]

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
