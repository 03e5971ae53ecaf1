"""Accounts and API tokens. Tokens are stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from control.errors import NotFound
from control.storage.db import Database

SCOPES = ("read", "write", "admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling: an account's user token, a runner token, or a build."""

    kind: str  # "user" | "runner" | "build"
    account_id: str | None
    token_id: str | None
    name: str
    scopes: frozenset[str]
    build_id: str | None = None


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


class AccountStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def ensure_account(self, name: str) -> str:
        """Return the id of account ``name``, creating it if needed."""
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO accounts (id, name) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (uuid.uuid4(), name),
            )
            cur = await conn.execute("SELECT id FROM accounts WHERE name = %s", (name,))
            row = await cur.fetchone()
            assert row is not None
            return str(row[0])

    async def create_token(
        self, account_id: str | None, name: str, kind: str, scopes: tuple[str, ...]
    ) -> tuple[str, str]:
        """Create a token; return (token id, token). The token is not stored."""
        token = new_token("cvr" if kind == "runner" else "cvy")
        token_id = str(uuid.uuid4())
        await self.add_token(token_id, account_id, name, kind, scopes, token)
        return token_id, token

    async def add_token(
        self,
        token_id: str,
        account_id: str | None,
        name: str,
        kind: str,
        scopes: tuple[str, ...],
        token: str,
    ) -> None:
        """Store a token the caller chose (bootstrap tokens from settings);
        a token already stored is left as it is."""
        async with self.db.connection() as conn:
            await conn.execute(
                "INSERT INTO api_tokens (id, account_id, name, kind, scopes, token_hash)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (token_hash) DO NOTHING",
                (token_id, account_id, name, kind, list(scopes), hash_token(token)),
            )

    async def authenticate(self, token: str) -> Principal | None:
        """Return the principal of a live user or runner token, else None."""
        async with self.db.connection() as conn:
            cur = await conn.execute(
                "SELECT id, account_id, name, kind, scopes FROM api_tokens"
                " WHERE token_hash = %s AND revoked_at IS NULL",
                (hash_token(token),),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return Principal(
            kind=row[3],
            account_id=str(row[1]) if row[1] else None,
            token_id=str(row[0]),
            name=row[2],
            scopes=frozenset(row[4]),
        )

    async def concurrency_limit(self, account_id: str) -> int:
        async with self.db.connection() as conn:
            cur = await conn.execute(
                "SELECT concurrency_limit FROM accounts WHERE id = %s", (account_id,)
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound("account not found")
        return int(row[0])
