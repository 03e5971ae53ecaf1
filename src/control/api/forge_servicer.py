"""ConfigService RPCs of the forge integration: deploy hooks. Mixed into
ConfigServicer; each validates the request, calls one service and
converts."""

from __future__ import annotations

from control.api import convert
from control.api.edge import Ctx, principal
from control.api.fields import required
from control.forge.links import Links
from control.services.registry import Services
from conveyor.v1 import config_service_pb2 as cs


class ForgeRpcs:
    """Needs ``self.services`` and ``self.links`` (the hook's URL)."""

    services: Services
    links: Links

    async def CreateDeployHook(
        self, request: cs.CreateDeployHookRequest, context: Ctx
    ) -> cs.CreateDeployHookResponse:
        name = required("name", request.name)
        hook, key = await self.services.hooks.create(
            principal(), required("project", request.project), name, request.branch
        )
        return cs.CreateDeployHookResponse(
            hook=convert.deploy_hook_to_pb(hook), key=key, url=self.links.deploy_hook(key)
        )

    async def ListDeployHooks(
        self, request: cs.ListDeployHooksRequest, context: Ctx
    ) -> cs.ListDeployHooksResponse:
        hooks = await self.services.hooks.list(principal(), required("project", request.project))
        return cs.ListDeployHooksResponse(hooks=[convert.deploy_hook_to_pb(h) for h in hooks])

    async def RevokeDeployHook(
        self, request: cs.RevokeDeployHookRequest, context: Ctx
    ) -> cs.RevokeDeployHookResponse:
        hook = await self.services.hooks.revoke(
            principal(),
            required("project", request.project),
            required("hook_id", request.hook_id),
        )
        return cs.RevokeDeployHookResponse(hook=convert.deploy_hook_to_pb(hook))
