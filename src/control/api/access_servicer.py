"""ConfigService RPCs about access: variables and secrets, tokens, accounts,
the audit log. Mixed into ConfigServicer; each validates the request, calls
one service and converts."""

from __future__ import annotations

from control.api import convert
from control.api.edge import Ctx, principal
from control.api.fields import required
from control.services.registry import Services
from conveyor.v1 import config_service_pb2 as cs


class AccessRpcs:
    """Needs ``self.services``."""

    services: Services

    async def SetEnvVar(self, request: cs.SetEnvVarRequest, context: Ctx) -> cs.SetEnvVarResponse:
        var = await self.services.env.set(
            principal(),
            required("project", request.project),
            request.name,
            request.value,
            secret=request.secret,
        )
        return cs.SetEnvVarResponse(var=convert.env_var_to_pb(var))

    async def UnsetEnvVar(
        self, request: cs.UnsetEnvVarRequest, context: Ctx
    ) -> cs.UnsetEnvVarResponse:
        await self.services.env.unset(
            principal(), required("project", request.project), required("name", request.name)
        )
        return cs.UnsetEnvVarResponse()

    async def ListEnvVars(
        self, request: cs.ListEnvVarsRequest, context: Ctx
    ) -> cs.ListEnvVarsResponse:
        found = await self.services.projects.env(principal(), required("project", request.project))
        return cs.ListEnvVarsResponse(vars=[convert.env_var_to_pb(v) for v in found])

    async def CreateToken(
        self, request: cs.CreateTokenRequest, context: Ctx
    ) -> cs.CreateTokenResponse:
        info, token = await self.services.tokens.create(
            principal(), required("name", request.name), tuple(request.scopes)
        )
        return cs.CreateTokenResponse(info=convert.token_to_pb(info), token=token)

    async def ListTokens(
        self, request: cs.ListTokensRequest, context: Ctx
    ) -> cs.ListTokensResponse:
        tokens = await self.services.tokens.list(principal())
        return cs.ListTokensResponse(tokens=[convert.token_to_pb(t) for t in tokens])

    async def RevokeToken(
        self, request: cs.RevokeTokenRequest, context: Ctx
    ) -> cs.RevokeTokenResponse:
        info = await self.services.tokens.revoke(
            principal(), required("token_id", request.token_id)
        )
        return cs.RevokeTokenResponse(info=convert.token_to_pb(info))

    async def CreateAccount(
        self, request: cs.CreateAccountRequest, context: Ctx
    ) -> cs.CreateAccountResponse:
        account, token = await self.services.accounts.create(
            principal(), request.name, request.concurrency_limit
        )
        return cs.CreateAccountResponse(account=convert.account_to_pb(account), admin_token=token)

    async def ListAuditEvents(
        self, request: cs.ListAuditEventsRequest, context: Ctx
    ) -> cs.ListAuditEventsResponse:
        events = await self.services.accounts.audit_events(principal(), request.limit)
        return cs.ListAuditEventsResponse(events=[convert.audit_event_to_pb(e) for e in events])

    async def RotateSecrets(
        self, request: cs.RotateSecretsRequest, context: Ctx
    ) -> cs.RotateSecretsResponse:
        done = await self.services.env.rotate_keys(principal())
        return cs.RotateSecretsResponse(reencrypted=done.reencrypted, key_id=done.key_id)
