"""Deploy hooks: every SQL statement about them. A hook's key is a secret
shown once; only its SHA-256 is stored."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from control.errors import FailedPrecondition, NotFound
from control.storage.accounts import hash_token
from control.storage.db import Conn, Database, fetch_value
from control.storage.ids import expand, is_prefix, is_uuid

MAX_HOOKS_PER_PROJECT = 50
KEY_PREFIX = "cvh_"
_COLUMNS = "id::text, project_id::text, name, branch, created_at, last_used_at, revoked_at"


@dataclass(frozen=True)
class DeployHook:
    id: str
    project_id: str
    name: str
    branch: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


_HOOK = class_row(DeployHook)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class DeployHookStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self, conn: Conn, project_id: str, name: str, branch: str
    ) -> tuple[DeployHook, str]:
        """Create a hook; return it and its key (never stored). Raises
        ``FailedPrecondition`` past ``MAX_HOOKS_PER_PROJECT`` live hooks."""
        live: int = await fetch_value(
            conn,
            "SELECT count(*) FROM deploy_hooks WHERE project_id = %s AND revoked_at IS NULL",
            (project_id,),
        )
        if live >= MAX_HOOKS_PER_PROJECT:
            raise FailedPrecondition(
                f"a project holds at most {MAX_HOOKS_PER_PROJECT} deploy hooks; revoke one first"
            )
        key = new_key()
        cur = conn.cursor(row_factory=_HOOK)
        await cur.execute(
            "INSERT INTO deploy_hooks (id, project_id, name, branch, key_hash)"
            f" VALUES (%s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (uuid.uuid4(), project_id, name, branch, hash_token(key)),
        )
        created = await cur.fetchone()
        assert created is not None  # INSERT ... RETURNING returns the row or raises
        return created, key

    async def list_for(self, project_id: str) -> list[DeployHook]:
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=_HOOK)
            await cur.execute(
                f"SELECT {_COLUMNS} FROM deploy_hooks WHERE project_id = %s ORDER BY created_at",
                (project_id,),
            )
            return await cur.fetchall()

    async def revoke(self, conn: Conn, project_id: str, hook_id: str) -> DeployHook:
        """Revoke a hook of the project (again: a no-op); ``hook_id`` is its
        id or a unique prefix of it. Raises ``NotFound``, or
        ``InvalidArgument("hook_id", ...)`` for an ambiguous prefix."""
        if is_prefix(hook_id):
            hook_id = await expand(
                conn, hook_id, table="deploy_hooks", kind="deploy hook", field="hook_id",
                scope="project_id = %s", params=(project_id,),
            )  # fmt: skip
        if not is_uuid(hook_id):
            raise NotFound(f"deploy hook {hook_id!r} not found")
        cur = conn.cursor(row_factory=_HOOK)
        await cur.execute(
            "UPDATE deploy_hooks SET revoked_at = coalesce(revoked_at, now())"
            f" WHERE id = %s AND project_id = %s RETURNING {_COLUMNS}",
            (hook_id, project_id),
        )
        hook = await cur.fetchone()
        if hook is None:
            raise NotFound(f"deploy hook {hook_id!r} not found")
        return hook

    async def take(self, conn: Conn, key: str) -> DeployHook | None:
        """The live hook with this key, locked until the caller's transaction
        ends (so calls of one hook queue one after the other), marked used.
        None for an unknown or revoked key."""
        if not key.startswith(KEY_PREFIX) or len(key) > 128:
            return None
        cur = conn.cursor(row_factory=_HOOK)
        await cur.execute(
            f"SELECT {_COLUMNS} FROM deploy_hooks WHERE key_hash = %s AND revoked_at IS NULL"
            " FOR UPDATE",
            (hash_token(key),),
        )
        hook = await cur.fetchone()
        if hook is None:
            return None
        await conn.execute("UPDATE deploy_hooks SET last_used_at = now() WHERE id = %s", (hook.id,))
        return hook

    async def find(self, key: str) -> DeployHook | None:
        """The live hook with this key, or None (no lock: see ``take``)."""
        if not key.startswith(KEY_PREFIX) or len(key) > 128:
            return None
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=_HOOK)
            await cur.execute(
                f"SELECT {_COLUMNS} FROM deploy_hooks WHERE key_hash = %s AND revoked_at IS NULL",
                (hash_token(key),),
            )
            return await cur.fetchone()

    async def waiting_build(
        self, conn: Conn, project_id: str, branch: str, commit_sha: str
    ) -> str | None:
        """A build of this commit that has not started yet (still queued),
        from any trigger: a second call is answered with it."""
        build_id: str | None = await fetch_value(
            conn,
            "SELECT id::text FROM builds WHERE project_id = %s AND branch = %s"
            " AND commit_sha = %s AND status = 'queued' ORDER BY created_at DESC LIMIT 1",
            (project_id, branch, commit_sha),
        )
        return build_id
