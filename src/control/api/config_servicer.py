"""ConfigService: projects, and the build views of the dashboard and CLI."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, fields, replace
from typing import Any

from control.api import convert
from control.api.access_servicer import AccessRpcs
from control.api.edge import Ctx, account_of_caller, principal
from control.api.fields import required
from control.api.forge_servicer import ForgeRpcs
from control.builds.lifecycle import Lifecycle
from control.domain import project as proj
from control.domain.project import ProjectSettings
from control.errors import FailedPrecondition, InvalidArgument
from control.forge.links import Links
from control.forge.remote import resolve_branch_head
from control.storage.audit import AuditLog
from control.storage.builds import BuildStore
from control.storage.db import Database
from control.storage.env import EnvStore
from control.storage.projects import UPDATABLE, ProjectStore
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc as cs_grpc

log = logging.getLogger(__name__)

MAX_LIST = 500


def settings_from(msg: cs.CreateProjectRequest) -> ProjectSettings:
    return ProjectSettings(
        name=msg.name,
        repo_url=msg.repo_url,
        production_branch=msg.production_branch or "main",
        build_command=msg.build_command,
        deploy_command=msg.deploy_command,
        preview_command=msg.preview_command,
        run_timeout_seconds=msg.run_timeout_seconds or proj.DEFAULT_RUN_TIMEOUT_SECONDS,
        cancel_in_progress=msg.cancel_in_progress,
        build_other_branches=msg.build_other_branches,
        root_directory=msg.root_directory,
        branch_include=tuple(msg.branch_include),
        branch_exclude=tuple(msg.branch_exclude),
        watch_include=tuple(msg.watch_include),
        watch_exclude=tuple(msg.watch_exclude),
        forge=msg.forge,
        forge_api_url=msg.forge_api_url,
        forge_repo=msg.forge_repo,
        network_isolated=msg.network_isolated,
        cache_disabled=msg.cache_disabled,
        cache_lockfiles=tuple(msg.cache_lockfiles),
        cache_paths=tuple(msg.cache_paths),
    )


class ConfigServicer(AccessRpcs, ForgeRpcs, cs_grpc.ConfigServiceServicer):
    def __init__(
        self,
        db: Database,
        projects: ProjectStore,
        builds: BuildStore,
        lifecycle: Lifecycle,
        env: EnvStore,
        audit: AuditLog,
        max_run_timeout: int,
        links: Links | None = None,
    ) -> None:
        self.db = db
        self.projects = projects
        self.builds = builds
        self.lifecycle = lifecycle
        self.env = env
        self.audit = audit
        self.max_run_timeout = max_run_timeout
        self.links = links or Links()

    async def CreateProject(
        self, request: cs.CreateProjectRequest, context: Ctx
    ) -> cs.CreateProjectResponse:
        settings = settings_from(request)
        settings.validate(self.max_run_timeout)
        account = account_of_caller()
        project = await self.projects.create(account, settings)
        await self.audit.record(
            None, account, principal().name, "project.create", f"project {project.name}",
            f"repo_url={project.repo_url}",
        )  # fmt: skip
        log.info("project created", extra={"project_id": project.id})
        return cs.CreateProjectResponse(project=convert.project_to_pb(project, with_secret=True))

    async def GetProject(
        self, request: cs.GetProjectRequest, context: Ctx
    ) -> cs.GetProjectResponse:
        project = await self.projects.get(account_of_caller(), required("project", request.project))
        return cs.GetProjectResponse(project=convert.project_to_pb(project, with_secret=True))

    async def ListProjects(
        self, request: cs.ListProjectsRequest, context: Ctx
    ) -> cs.ListProjectsResponse:
        projects = await self.projects.list_for(account_of_caller())
        return cs.ListProjectsResponse(
            projects=[convert.project_to_pb(p, with_secret=False) for p in projects]
        )

    async def UpdateProject(
        self, request: cs.UpdateProjectRequest, context: Ctx
    ) -> cs.UpdateProjectResponse:
        account = account_of_caller()
        ref = required("project", request.project)
        unknown = [m for m in request.update_mask if m not in UPDATABLE]
        if unknown:
            raise InvalidArgument("update_mask", f"cannot update {', '.join(unknown)}")
        if not request.update_mask:
            raise InvalidArgument("update_mask", "name at least one field to change")
        current = await self.projects.get(account, ref)
        base = ProjectSettings(
            **{f.name: getattr(current, f.name) for f in fields(ProjectSettings)}
        )
        values = {m: _plain(getattr(request.values, m)) for m in request.update_mask}
        updated = replace(base, **values)
        updated.validate(self.max_run_timeout)
        changes = {k: v for k, v in asdict(updated).items() if k in values}
        project = await self.projects.update(account, current.id, changes)
        await self.audit.record(
            None, account, principal().name, "project.update", f"project {project.name}",
            "changed=" + ",".join(sorted(changes)),
        )  # fmt: skip
        return cs.UpdateProjectResponse(project=convert.project_to_pb(project, with_secret=False))

    async def DeleteProject(
        self, request: cs.DeleteProjectRequest, context: Ctx
    ) -> cs.DeleteProjectResponse:
        account = account_of_caller()
        project = await self.projects.delete(account, required("project", request.project))
        await self.audit.record(
            None, account, principal().name, "project.delete", f"project {project.name}"
        )
        log.info("project deleted", extra={"project_id": project.id})
        return cs.DeleteProjectResponse()

    async def TriggerBuild(
        self, request: cs.TriggerBuildRequest, context: Ctx
    ) -> cs.TriggerBuildResponse:
        account = account_of_caller()
        project = await self.projects.get(account, required("project", request.project))
        branch = request.branch or project.production_branch
        proj.validate_branch("branch", branch)
        if request.commit_sha:
            proj.validate_commit_sha("commit_sha", request.commit_sha)
            sha = request.commit_sha
        else:
            sha = await resolve_branch_head(project.repo_url, branch)
        build_id = await self.lifecycle.queue(
            project, branch=branch, commit_sha=sha, trigger="manual"
        )
        build = await self.builds.get(account, build_id)
        return cs.TriggerBuildResponse(build=convert.build_to_pb(build))

    async def PurgeCache(
        self, request: cs.PurgeCacheRequest, context: Ctx
    ) -> cs.PurgeCacheResponse:
        account = account_of_caller()
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(
                conn, account, required("project", request.project)
            )
            generation = await self.projects.purge_cache(conn, account, project.id)
            await self.audit.record(
                conn, account, principal().name, "cache.purge", f"project {project.name}",
                f"generation={generation}",
            )  # fmt: skip
        log.info("build cache purged: generation %d", generation, extra={"project_id": project.id})
        return cs.PurgeCacheResponse(generation=generation)

    async def ListBuilds(
        self, request: cs.ListBuildsRequest, context: Ctx
    ) -> cs.ListBuildsResponse:
        account = account_of_caller()
        if request.limit < 0 or request.limit > MAX_LIST:
            raise InvalidArgument("limit", f"must be between 0 and {MAX_LIST}")
        project_id = None
        if request.project:
            project_id = (await self.projects.get(account, request.project)).id
        builds = await self.builds.list_for(account, project_id, request.limit or 50)
        skipped = []
        if request.include_skipped:
            skipped = await self.skipped_pushes(account, project_id, request.limit or 50)
        return cs.ListBuildsResponse(
            builds=[convert.build_to_pb(b) for b in builds], skipped=skipped
        )

    async def GetBuild(self, request: cs.GetBuildRequest, context: Ctx) -> cs.GetBuildResponse:
        build = await self.builds.get(account_of_caller(), required("build_id", request.build_id))
        return cs.GetBuildResponse(build=convert.build_to_pb(build))

    async def RetryBuild(
        self, request: cs.RetryBuildRequest, context: Ctx
    ) -> cs.RetryBuildResponse:
        account = account_of_caller()
        old = await self.builds.get(account, required("build_id", request.build_id))
        if not old.status.final:
            raise FailedPrecondition(
                f"build is {old.status.value}; only a finished build can be retried"
            )
        project = await self.projects.get(account, old.project_id)
        build_id = await self.lifecycle.queue(
            project,
            branch=old.branch,
            commit_sha=old.commit_sha,
            trigger="retry",
            production=old.production,
            retry_of=old.id,
        )
        log.info("retry of %s by %s", old.id, principal().name, extra={"build_id": build_id})
        build = await self.builds.get(account, build_id)
        return cs.RetryBuildResponse(build=convert.build_to_pb(build))


def _plain(value: Any) -> Any:
    """A repeated protobuf field as a tuple, as ``ProjectSettings`` holds it."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return value
    return tuple(value)
