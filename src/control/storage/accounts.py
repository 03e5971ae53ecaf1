"""Accounts and API tokens. Tokens are stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row, kwargs_row

from control.errors import NotFound
from control.storage.db import Conn, Database, fetch_value
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


def _principal(*, scopes: list[str], **columns: Any) -> Principal:
    return Principal(scopes=frozenset(scopes), **columns)


# Rows of a token's ``id AS token_id, account_id, name, kind, scopes``
# (ids as text) become Principals.
_PRINCIPAL = kwargs_row(_principal)


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
            await conn.execute(
                "INSERT INTO accounts (id, name) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (uuid.uuid4(), name),
            )
            account_id: str = await fetch_value(
                conn, "SELECT id::text FROM accounts WHERE name = %s", (name,)
            )
            return account_id

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
            cur = conn.cursor(row_factory=_PRINCIPAL)
            await cur.execute(
                "SELECT id::text AS token_id, account_id::text, name, kind, scopes"
                " FROM api_tokens WHERE token_hash = %s AND revoked_at IS NULL",
                (hash_token(token),),
            )
            return await cur.fetchone()

    async def concurrency_limit(self, account_id: str) -> int:
        async with self.db.connection() as conn:
            limit: int | None = await fetch_value(
                conn, "SELECT concurrency_limit FROM accounts WHERE id = %s", (account_id,)
            )
        if limit is None:
            raise NotFound("account not found")
        return limit


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


def _token_info(*, scopes: list[str], **columns: Any) -> TokenInfo:
    return TokenInfo(scopes=tuple(scopes), **columns)


_TOKEN_INFO = kwargs_row(_token_info)
_INFO_COLUMNS = "id::text, name, scopes, created_at, revoked_at"


async def list_tokens(db: Database, account_id: str) -> list[TokenInfo]:
    async with db.connection() as conn:
        cur = conn.cursor(row_factory=_TOKEN_INFO)
        await cur.execute(
            f"SELECT {_INFO_COLUMNS} FROM api_tokens"
            " WHERE account_id = %s AND kind = 'user' ORDER BY created_at",
            (account_id,),
        )
        return await cur.fetchall()


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
    cur = conn.cursor(row_factory=_TOKEN_INFO)
    await cur.execute(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())"
        " WHERE id = %s AND account_id = %s AND kind = 'user'"
        f" RETURNING {_INFO_COLUMNS}",
        (token_id, account_id),
    )
    revoked = await cur.fetchone()
    if revoked is None:
        raise NotFound(f"token {token_id!r} not found")
    return revoked


async def create_account(conn: Conn, name: str, concurrency_limit: int) -> Account:
    cur = conn.cursor(row_factory=class_row(Account))
    await cur.execute(
        "INSERT INTO accounts (id, name, concurrency_limit) VALUES (%s, %s, %s)"
        " RETURNING id::text, name, concurrency_limit, created_at",
        (uuid.uuid4(), name, concurrency_limit),
    )
    account = await cur.fetchone()
    assert account is not None  # INSERT ... RETURNING returns the row or raises
    return account


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
