"""Dashboard sessions: every SQL statement about them.

A session is opened with a live user token and stores only the SHA-256 of
its random id. Looking one up joins the token, so a revoked token ends its
sessions at once and an expired session is never returned.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg.rows import kwargs_row

from control.storage.accounts import Principal, hash_token
from control.storage.db import Database


@dataclass(frozen=True)
class WebSession:
    """A live session: who it acts as, the CSRF token its forms and fetches
    must send back, and when it ends."""

    principal: Principal
    csrf_token: str
    expires_at: datetime


def _session(
    *, csrf_token: str, expires_at: datetime, scopes: list[str], **token: Any
) -> WebSession:
    return WebSession(Principal(scopes=frozenset(scopes), **token), csrf_token, expires_at)


class SessionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def open(self, token: str, ttl: timedelta) -> tuple[str, WebSession] | None:
        """Open a session for the live *user* token ``token`` lasting ``ttl``;
        return (the cookie value, the session), or None when the token is
        unknown, revoked, a runner's, or of no account. Expired sessions are
        deleted on the way."""
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        async with self.db.transaction() as conn:
            await conn.execute("DELETE FROM web_sessions WHERE expires_at < now()")
            cur = await conn.execute(
                "INSERT INTO web_sessions (id_hash, token_id, csrf_token, expires_at)"
                " SELECT %s, t.id, %s, now() + %s FROM api_tokens t"
                " WHERE t.token_hash = %s AND t.revoked_at IS NULL AND t.kind = 'user'"
                " AND t.account_id IS NOT NULL"
                " RETURNING token_id",
                (hash_token(session_id), csrf, ttl, hash_token(token)),
            )
            if await cur.fetchone() is None:
                return None
        found = await self.get(session_id)
        return (session_id, found) if found else None

    async def get(self, session_id: str) -> WebSession | None:
        """The live session with this cookie value, or None (unknown,
        expired, or its token revoked)."""
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=kwargs_row(_session))
            await cur.execute(
                "SELECT t.id::text AS token_id, t.account_id::text, t.name, 'user' AS kind,"
                " t.scopes, s.csrf_token, s.expires_at"
                " FROM web_sessions s JOIN api_tokens t ON t.id = s.token_id"
                " WHERE s.id_hash = %s AND s.expires_at > now() AND t.revoked_at IS NULL",
                (hash_token(session_id),),
            )
            return await cur.fetchone()

    async def close(self, session_id: str) -> None:
        """End a session (sign out); unknown ids are ignored."""
        async with self.db.connection() as conn:
            await conn.execute(
                "DELETE FROM web_sessions WHERE id_hash = %s", (hash_token(session_id),)
            )
