"""Accounts (created by the installation's operator, each with its first
admin token) and an account's audit log."""

from __future__ import annotations

from control.domain.project import validate_name
from control.errors import InvalidArgument
from control.services.access import check, require
from control.storage import accounts as accounts_store
from control.storage.accounts import Account, Principal
from control.storage.audit import AuditEvent, AuditLog
from control.storage.db import Database

DEFAULT_CONCURRENCY = 6
MAX_CONCURRENCY = 1000
MAX_AUDIT = 1000
DEFAULT_AUDIT = 100


class AccountService:
    """Raises ``PermissionDenied`` for a missing scope, ``InvalidArgument``
    naming the wrong field and ``AlreadyExists`` for a taken name."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    async def create(
        self, caller: Principal, name: str, concurrency_limit: int = 0
    ) -> tuple[Account, str]:
        """A new account (the "system" scope) running at most
        ``concurrency_limit`` builds at once (0: ``DEFAULT_CONCURRENCY``),
        and its first token, an admin one, which is never stored and must be
        handed to the account's owner now. The audit row is the new
        account's."""
        check(caller, "system")
        validate_name(name)
        limit = concurrency_limit or DEFAULT_CONCURRENCY
        if not 1 <= limit <= MAX_CONCURRENCY:
            raise InvalidArgument("concurrency_limit", f"must be between 1 and {MAX_CONCURRENCY}")
        async with self.db.transaction() as conn:
            account = await accounts_store.create_account(conn, name, limit)
            _, token = await accounts_store.insert_token(
                conn, account.id, "admin", "user", ("admin",)
            )
            await self.audit.record(
                conn, account.id, caller.name, "account.create", f"account {account.name}"
            )
        return account, token

    async def audit_events(self, caller: Principal, limit: int = 0) -> list[AuditEvent]:
        """The newest ``limit`` (0: ``DEFAULT_AUDIT``, at most ``MAX_AUDIT``)
        events of the caller's account, newest first (the "admin" scope)."""
        account = require(caller, "admin")
        if not 0 <= limit <= MAX_AUDIT:
            raise InvalidArgument("limit", f"must be between 0 and {MAX_AUDIT}")
        return await self.audit.list_for(account, limit or DEFAULT_AUDIT)
