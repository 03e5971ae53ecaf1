"""ConfigService: projects, and the build views of the dashboard and CLI."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from control.api import convert
from control.api.access_servicer import AccessRpcs
from control.api.edge import Ctx, principal
from control.api.fields import required
from control.api.fleet_servicer import FleetRpcs
from control.api.forge_servicer import ForgeRpcs
from control.domain.project_fields import UPDATABLE
from control.errors import InvalidArgument
from control.forge.links import Links
from control.services.builds import BuildFilter
from control.services.registry import Services
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc as cs_grpc
from conveyor.v1 import types_pb2 as pb


class ConfigServicer(AccessRpcs, ForgeRpcs, FleetRpcs, cs_grpc.ConfigServiceServicer):
    """Each RPC validates the request, calls one method of ``services`` with
    the caller, and converts the answer; ``links`` makes deploy hooks' URLs."""

    def __init__(self, services: Services, links: Links | None = None) -> None:
        self.services = services
        self.links = links or Links()

    async def CreateProject(
        self, request: cs.CreateProjectRequest, context: Ctx
    ) -> cs.CreateProjectResponse:
        project = await self.services.projects.create(
            principal(), convert.settings_from_pb(request)
        )
        return cs.CreateProjectResponse(project=convert.project_to_pb(project, with_secret=True))

    async def GetProject(
        self, request: cs.GetProjectRequest, context: Ctx
    ) -> cs.GetProjectResponse:
        project = await self.services.projects.get(
            principal(), required("project", request.project)
        )
        # The webhook secret signs pushes that deploy: a read never shows it.
        return cs.GetProjectResponse(project=convert.project_to_pb(project, with_secret=False))

    async def ListProjects(
        self, request: cs.ListProjectsRequest, context: Ctx
    ) -> cs.ListProjectsResponse:
        found = await self.services.projects.list_projects(principal())
        return cs.ListProjectsResponse(
            projects=[convert.project_to_pb(p, with_secret=False) for p in found]
        )

    async def UpdateProject(
        self, request: cs.UpdateProjectRequest, context: Ctx
    ) -> cs.UpdateProjectResponse:
        ref = required("project", request.project)
        mask = _mask_of(request)
        named = "mask" if request.mask.paths else "update_mask"
        unknown = [m for m in mask if m not in UPDATABLE]
        if unknown:
            raise InvalidArgument(named, f"cannot update {', '.join(unknown)}")
        if not mask:
            raise InvalidArgument(named, "name at least one field to change")
        values = {m: _plain(getattr(request.values, m)) for m in mask}
        project = await self.services.projects.update(principal(), ref, values)
        return cs.UpdateProjectResponse(project=convert.project_to_pb(project, with_secret=False))

    async def DeleteProject(
        self, request: cs.DeleteProjectRequest, context: Ctx
    ) -> cs.DeleteProjectResponse:
        await self.services.projects.delete(principal(), required("project", request.project))
        return cs.DeleteProjectResponse()

    async def RotateWebhookSecret(
        self, request: cs.RotateWebhookSecretRequest, context: Ctx
    ) -> cs.RotateWebhookSecretResponse:
        project = await self.services.projects.rotate_webhook_secret(
            principal(), required("project", request.project)
        )
        return cs.RotateWebhookSecretResponse(
            project=convert.project_to_pb(project, with_secret=True)
        )

    async def TriggerBuild(
        self, request: cs.TriggerBuildRequest, context: Ctx
    ) -> cs.TriggerBuildResponse:
        build = await self.services.builds.trigger(
            principal(),
            required("project", request.project),
            branch=request.branch,
            commit_sha=request.commit_sha,
        )
        return cs.TriggerBuildResponse(build=convert.build_to_pb(build))

    async def PurgeCache(
        self, request: cs.PurgeCacheRequest, context: Ctx
    ) -> cs.PurgeCacheResponse:
        generation = await self.services.projects.purge_cache(
            principal(), required("project", request.project)
        )
        return cs.PurgeCacheResponse(generation=generation)

    async def ListBuilds(
        self, request: cs.ListBuildsRequest, context: Ctx
    ) -> cs.ListBuildsResponse:
        caller = principal()
        status = convert.BUILD_STATUS_FROM_PB.get(request.status)
        if status is None and request.status != pb.BUILD_STATUS_UNSPECIFIED:
            raise InvalidArgument("status", f"{request.status} is not a build status")
        filters = BuildFilter(
            branch=request.branch, status=status.value if status else "", trigger=request.trigger
        )
        page = await self.services.builds.list(
            caller,
            request.project or None,
            filters=filters,
            limit=request.limit,
            page_token=request.page_token,
        )
        skipped = []
        if request.include_skipped:
            pushes = await self.services.builds.skipped(
                caller, request.project or None, request.limit
            )
            skipped = [convert.skipped_push_to_pb(p) for p in pushes]
        return cs.ListBuildsResponse(
            builds=[convert.build_to_pb(b) for b in page.builds],
            skipped=skipped,
            next_page_token=page.next_page_token,
        )

    async def GetBuild(self, request: cs.GetBuildRequest, context: Ctx) -> cs.GetBuildResponse:
        build = await self.services.builds.get(principal(), required("build_id", request.build_id))
        return cs.GetBuildResponse(build=convert.build_to_pb(build))

    async def RetryBuild(
        self, request: cs.RetryBuildRequest, context: Ctx
    ) -> cs.RetryBuildResponse:
        build = await self.services.builds.retry(
            principal(), required("build_id", request.build_id)
        )
        return cs.RetryBuildResponse(build=convert.build_to_pb(build))


def _mask_of(request: cs.UpdateProjectRequest) -> list[str]:
    """The field names an update names, from ``mask`` or the older
    ``update_mask``; raises ``InvalidArgument`` when both are given."""
    if request.mask.paths and request.update_mask:
        raise InvalidArgument("mask", "give mask or update_mask, not both")
    return list(request.mask.paths or request.update_mask)


def _plain(value: Any) -> Any:
    """A repeated protobuf field as a tuple, as ``ProjectSettings`` holds it."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return value
    return tuple(value)
