"""ConfigService RPCs about access: variables and secrets, tokens, accounts,
the audit log. Mixed into ConfigServicer."""

from __future__ import annotations

import logging

from control.api import convert
from control.api.edge import Ctx, account_of_caller, principal
from control.api.fields import required
from control.domain.env import validate_var
from control.domain.project import validate_name
from control.errors import InvalidArgument
from control.storage import accounts as accounts_store
from control.storage.audit import AuditLog
from control.storage.db import Database
from control.storage.env import EnvStore
from control.storage.ids import is_prefix, is_uuid
from control.storage.projects import ProjectStore
from conveyor.v1 import config_service_pb2 as cs

log = logging.getLogger(__name__)

MAX_TOKEN_NAME = 64
MAX_AUDIT = 1000


class AccessRpcs:
    db: Database
    projects: ProjectStore
    env: EnvStore
    audit: AuditLog

    async def SetEnvVar(self, request: cs.SetEnvVarRequest, context: Ctx) -> cs.SetEnvVarResponse:
        account = account_of_caller()
        validate_var(request.name, request.value)
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(
                conn, account, required("project", request.project)
            )
            var = await self.env.set(conn, project.id, request.name, request.value, request.secret)
            await self.audit.record(
                conn, account, principal().name,
                "secret.set" if request.secret else "env.set",
                f"project {project.name}", f"name={request.name}",
            )  # fmt: skip
        msg = cs.ProjectEnvVar(name=var.name, value=var.value, secret=var.secret)
        msg.updated_at.FromDatetime(var.updated_at)
        return cs.SetEnvVarResponse(var=msg)

    async def UnsetEnvVar(
        self, request: cs.UnsetEnvVarRequest, context: Ctx
    ) -> cs.UnsetEnvVarResponse:
        account = account_of_caller()
        async with self.db.transaction() as conn:
            project = await self.projects.get_in(
                conn, account, required("project", request.project)
            )
            await self.env.unset(conn, project.id, required("name", request.name))
            await self.audit.record(
                conn, account, principal().name, "env.unset",
                f"project {project.name}", f"name={request.name}",
            )  # fmt: skip
        return cs.UnsetEnvVarResponse()

    async def ListEnvVars(
        self, request: cs.ListEnvVarsRequest, context: Ctx
    ) -> cs.ListEnvVarsResponse:
        project = await self.projects.get(account_of_caller(), required("project", request.project))
        out = []
        for var in await self.env.list_for(project.id):
            msg = cs.ProjectEnvVar(name=var.name, value=var.value, secret=var.secret)
            msg.updated_at.FromDatetime(var.updated_at)
            out.append(msg)
        return cs.ListEnvVarsResponse(vars=out)

    async def CreateToken(
        self, request: cs.CreateTokenRequest, context: Ctx
    ) -> cs.CreateTokenResponse:
        account = account_of_caller()
        name = required("name", request.name)
        if len(name) > MAX_TOKEN_NAME or not name.isprintable():
            raise InvalidArgument("name", f"must be 1-{MAX_TOKEN_NAME} printable characters")
        scopes = tuple(dict.fromkeys(request.scopes)) or ("read",)
        unknown = [s for s in scopes if s not in accounts_store.SCOPES]
        if unknown:
            raise InvalidArgument(
                "scopes", f"unknown scope {unknown[0]!r}; use {', '.join(accounts_store.SCOPES)}"
            )
        async with self.db.transaction() as conn:
            token_id, token = await accounts_store.insert_token(conn, account, name, "user", scopes)
            await self.audit.record(
                conn, account, principal().name, "token.create",
                f"token {name}", f"id={token_id} scopes={','.join(scopes)}",
            )  # fmt: skip
        info = cs.Token(id=token_id, name=name, scopes=list(scopes))
        info.created_at.GetCurrentTime()
        return cs.CreateTokenResponse(info=info, token=token)

    async def ListTokens(
        self, request: cs.ListTokensRequest, context: Ctx
    ) -> cs.ListTokensResponse:
        tokens = await accounts_store.list_tokens(self.db, account_of_caller())
        return cs.ListTokensResponse(tokens=[_token_pb(t) for t in tokens])

    async def RevokeToken(
        self, request: cs.RevokeTokenRequest, context: Ctx
    ) -> cs.RevokeTokenResponse:
        account = account_of_caller()
        token_id = required("token_id", request.token_id)
        if not (is_uuid(token_id) or is_prefix(token_id)):
            raise InvalidArgument(
                "token_id", "must be a token id (or 6+ of its first characters) from `tokens list`"
            )
        async with self.db.transaction() as conn:
            info = await accounts_store.revoke_token(conn, account, token_id)
            await self.audit.record(
                conn, account, principal().name, "token.revoke", f"token {info.name}",
                f"id={info.id}",
            )  # fmt: skip
        return cs.RevokeTokenResponse(info=_token_pb(info))

    async def CreateAccount(
        self, request: cs.CreateAccountRequest, context: Ctx
    ) -> cs.CreateAccountResponse:
        validate_name(request.name)
        limit = request.concurrency_limit or 6
        if not 1 <= limit <= 1000:
            raise InvalidArgument("concurrency_limit", "must be between 1 and 1000")
        async with self.db.transaction() as conn:
            account = await accounts_store.create_account(conn, request.name, limit)
            _, token = await accounts_store.insert_token(
                conn, account.id, "admin", "user", ("admin",)
            )
            await self.audit.record(
                conn, account.id, principal().name, "account.create", f"account {account.name}"
            )
        msg = cs.Account(id=account.id, name=account.name, concurrency_limit=limit)
        msg.created_at.FromDatetime(account.created_at)
        return cs.CreateAccountResponse(account=msg, admin_token=token)

    async def ListAuditEvents(
        self, request: cs.ListAuditEventsRequest, context: Ctx
    ) -> cs.ListAuditEventsResponse:
        if not 0 <= request.limit <= MAX_AUDIT:
            raise InvalidArgument("limit", f"must be between 0 and {MAX_AUDIT}")
        events = await self.audit.list_for(account_of_caller(), request.limit or 100)
        out = []
        for e in events:
            msg = cs.AuditEvent(actor=e.actor, action=e.action, target=e.target, details=e.details)
            msg.time.FromDatetime(e.at)
            out.append(msg)
        return cs.ListAuditEventsResponse(events=out)

    async def RotateSecrets(
        self, request: cs.RotateSecretsRequest, context: Ctx
    ) -> cs.RotateSecretsResponse:
        count = await self.env.rotate()
        await self.audit.record(
            None, principal().account_id, principal().name, "secrets.rotate",
            f"key {self.env.box.current}", f"reencrypted={count}",
        )  # fmt: skip
        log.info("re-encrypted %d secrets under key %s", count, self.env.box.current)
        return cs.RotateSecretsResponse(reencrypted=count, key_id=self.env.box.current)


def _token_pb(info: accounts_store.TokenInfo) -> cs.Token:
    msg = cs.Token(id=info.id, name=info.name, scopes=list(info.scopes))
    convert.timestamp(info.created_at, msg.created_at)
    convert.timestamp(info.revoked_at, msg.revoked_at)
    return msg
