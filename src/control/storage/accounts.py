"""Accounts and API tokens. Tokens are stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from control.errors import NotFound
from control.storage.db import Conn, Database
from control.storage.ids import expand, is_prefix, is_uuid

# "system" is held only by the bootstrap admin token: it creates accounts and
# rotates the secret key. The others are per account, each implying the next.
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

    async def add_token(
        self,
        token_id: str,
        account_id: str | None,
        name: str,
        kind: str,
        scopes: tuple[str, ...],
        token: str,
    ) -> None:
        """Store a token the caller chose (bootstrap tokens from settings).
        The settings are authoritative for its scopes; a revoked token stays
        revoked."""
        async with self.db.connection() as conn:
            await conn.execute(
                "INSERT INTO api_tokens (id, account_id, name, kind, scopes, token_hash)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (token_hash) DO UPDATE SET scopes = excluded.scopes",
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


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    concurrency_limit: int
    created_at: datetime


async def list_tokens(db: Database, account_id: str) -> list[TokenInfo]:
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT id, name, scopes, created_at, revoked_at FROM api_tokens"
            " WHERE account_id = %s AND kind = 'user' ORDER BY created_at",
            (account_id,),
        )
        return [TokenInfo(str(r[0]), r[1], tuple(r[2]), r[3], r[4]) for r in await cur.fetchall()]


async def revoke_token(conn: Conn, account_id: str, token_id: str) -> TokenInfo:
    """Revoke a token of this account: ``token_id`` is its id or a unique
    prefix of it. ``NotFound`` for any other, ``InvalidArgument("token_id",
    ...)`` listing the candidates for an ambiguous prefix."""
    if is_prefix(token_id):
        token_id = await expand(
            conn, token_id, table="api_tokens", kind="token", field="token_id",
            scope="account_id = %s AND kind = 'user'", params=(account_id,),
        )  # fmt: skip
    if not is_uuid(token_id):
        raise NotFound(f"token {token_id!r} not found")
    cur = await conn.execute(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())"
        " WHERE id = %s AND account_id = %s AND kind = 'user'"
        " RETURNING id, name, scopes, created_at, revoked_at",
        (token_id, account_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"token {token_id!r} not found")
    return TokenInfo(str(row[0]), row[1], tuple(row[2]), row[3], row[4])


async def create_account(conn: Conn, name: str, concurrency_limit: int) -> Account:
    cur = await conn.execute(
        "INSERT INTO accounts (id, name, concurrency_limit) VALUES (%s, %s, %s)"
        " RETURNING id, name, concurrency_limit, created_at",
        (uuid.uuid4(), name, concurrency_limit),
    )
    row = await cur.fetchone()
    assert row is not None
    return Account(str(row[0]), row[1], row[2], row[3])


async def insert_token(
    conn: Conn, account_id: str | None, name: str, kind: str, scopes: tuple[str, ...]
) -> tuple[str, str]:
    """Create a token in the caller's transaction; return (id, token)."""
    token = new_token("cvr" if kind == "runner" else "cvy")
    token_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO api_tokens (id, account_id, name, kind, scopes, token_hash)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (token_id, account_id, name, kind, list(scopes), hash_token(token)),
    )
    return token_id, token
