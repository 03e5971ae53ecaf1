"""An account's API tokens: create (the token shown once), list, revoke.
Each change is one transaction with its audit row."""

from __future__ import annotations

import builtins
from datetime import UTC, datetime

from control.errors import InvalidArgument
from control.services.access import require
from control.storage import accounts as accounts_store
from control.storage.accounts import Principal, TokenInfo
from control.storage.audit import AuditLog
from control.storage.db import Database
from control.storage.ids import is_prefix, is_uuid

MAX_TOKEN_NAME = 64


class TokenService:
    """Every method needs the "admin" scope and touches only the caller's
    account's user tokens. Raises ``PermissionDenied``, ``InvalidArgument``
    naming the wrong field, and ``NotFound`` for a token that is missing or
    another account's."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    async def create(
        self, caller: Principal, name: str, scopes: tuple[str, ...] = ()
    ) -> tuple[TokenInfo, str]:
        """A new token named ``name`` holding ``scopes`` (none given:
        "read"; repeats dropped); returns it and the secret token, which is
        never stored and must be shown to the user now."""
        account = require(caller, "admin")
        if not name or len(name) > MAX_TOKEN_NAME or not name.isprintable():
            raise InvalidArgument("name", f"must be 1-{MAX_TOKEN_NAME} printable characters")
        scopes = tuple(dict.fromkeys(scopes)) or ("read",)
        unknown = [s for s in scopes if s not in accounts_store.SCOPES]
        if unknown:
            raise InvalidArgument(
                "scopes", f"unknown scope {unknown[0]!r}; use {', '.join(accounts_store.SCOPES)}"
            )
        async with self.db.transaction() as conn:
            token_id, token = await accounts_store.insert_token(conn, account, name, "user", scopes)
            await self.audit.record(
                conn, account, caller.name, "token.create",
                f"token {name}", f"id={token_id} scopes={','.join(scopes)}",
            )  # fmt: skip
        return TokenInfo(token_id, name, scopes, datetime.now(UTC), None), token

    async def list(self, caller: Principal) -> builtins.list[TokenInfo]:
        """The account's user tokens, oldest first, revoked ones included."""
        return await accounts_store.list_tokens(self.db, require(caller, "admin"))

    async def revoke(self, caller: Principal, token_id: str) -> TokenInfo:
        """Revoke token ``token_id`` (its id or 6+ of its first characters);
        revoking a revoked token answers it unchanged."""
        account = require(caller, "admin")
        if not (is_uuid(token_id) or is_prefix(token_id)):
            raise InvalidArgument(
                "token_id", "must be a token id (or 6+ of its first characters) from `tokens list`"
            )
        async with self.db.transaction() as conn:
            info = await accounts_store.revoke_token(conn, account, token_id)
            await self.audit.record(
                conn, account, caller.name, "token.revoke", f"token {info.name}", f"id={info.id}"
            )
        return info
