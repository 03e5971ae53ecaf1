"""The audit log: who changed what, when. Never a secret value."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from control.storage.db import Conn, Database


@dataclass(frozen=True)
class AuditEvent:
    at: datetime
    actor: str
    action: str
    target: str
    details: str


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(
        self,
        conn: Conn | None,
        account_id: str | None,
        actor: str,
        action: str,
        target: str,
        details: str = "",
    ) -> None:
        """Record an event, inside the caller's transaction when given one so
        that the change and its record commit together."""
        sql = (
            "INSERT INTO audit_log (account_id, actor, action, target, details)"
            " VALUES (%s, %s, %s, %s, %s)"
        )
        params = (account_id, actor, action, target, details[:2000])
        if conn is not None:
            await conn.execute(sql, params)
            return
        async with self.db.connection() as own:
            await own.execute(sql, params)

    async def list_for(self, account_id: str, limit: int) -> list[AuditEvent]:
        async with self.db.connection() as conn:
            cur = await conn.execute(
                "SELECT at, actor, action, target, details FROM audit_log"
                " WHERE account_id = %s ORDER BY id DESC LIMIT %s",
                (account_id, limit),
            )
            return [AuditEvent(*r) for r in await cur.fetchall()]
