"""ConfigService RPCs of the forge integration: deploy hooks, and the pushes
that did not build. Mixed into ConfigServicer."""

from __future__ import annotations

import logging

from control.api import convert
from control.api.edge import Ctx, account_of_caller, principal
from control.api.fields import required
from control.domain.project import validate_branch
from control.errors import InvalidArgument
from control.forge.links import Links
from control.storage.audit import AuditLog
from control.storage.db import Database
from control.storage.hooks import DeployHookStore
from control.storage.projects import ProjectStore
from control.storage.pushes import PushLog
from conveyor.v1 import config_service_pb2 as cs

log = logging.getLogger(__name__)

MAX_HOOK_NAME = 64


class ForgeRpcs:
    db: Database
    projects: ProjectStore
    audit: AuditLog
    links: Links

    async def CreateDeployHook(
        self, request: cs.CreateDeployHookRequest, context: Ctx
    ) -> cs.CreateDeployHookResponse:
        account = account_of_caller()
        name = required("name", request.name)
        if len(name) > MAX_HOOK_NAME or not name.isprintable():
            raise InvalidArgument("name", f"must be 1-{MAX_HOOK_NAME} printable characters")
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(
                conn, account, required("project", request.project)
            )
            branch = request.branch or project.production_branch
            validate_branch("branch", branch)
            hook, key = await DeployHookStore(self.db).create(conn, project.id, name, branch)
            await self.audit.record(
                conn, account, principal().name, "hook.create", f"project {project.name}",
                f"id={hook.id} name={name} branch={branch}",
            )  # fmt: skip
        log.info("deploy hook %s created", hook.id, extra={"project_id": project.id})
        return cs.CreateDeployHookResponse(
            hook=convert.deploy_hook_to_pb(hook), key=key, url=self.links.deploy_hook(key)
        )

    async def ListDeployHooks(
        self, request: cs.ListDeployHooksRequest, context: Ctx
    ) -> cs.ListDeployHooksResponse:
        project = await self.projects.get(account_of_caller(), required("project", request.project))
        hooks = await DeployHookStore(self.db).list_for(project.id)
        return cs.ListDeployHooksResponse(hooks=[convert.deploy_hook_to_pb(h) for h in hooks])

    async def RevokeDeployHook(
        self, request: cs.RevokeDeployHookRequest, context: Ctx
    ) -> cs.RevokeDeployHookResponse:
        account = account_of_caller()
        hook_id = required("hook_id", request.hook_id)
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(
                conn, account, required("project", request.project)
            )
            hook = await DeployHookStore(self.db).revoke(conn, project.id, hook_id)
            await self.audit.record(
                conn, account, principal().name, "hook.revoke", f"project {project.name}",
                f"id={hook.id} name={hook.name}",
            )  # fmt: skip
        return cs.RevokeDeployHookResponse(hook=convert.deploy_hook_to_pb(hook))

    async def skipped_pushes(
        self, account: str, project_id: str | None, limit: int
    ) -> list[cs.SkippedPush]:
        """For ListBuilds ``include_skipped``: the newest pushes that did
        not build."""
        pushes = await PushLog(self.db).skipped(account, project_id, limit)
        return [convert.skipped_push_to_pb(p) for p in pushes]
