"""Project variables: plain values and encrypted secrets."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from control.domain.env import MAX_VARS_PER_PROJECT
from control.errors import FailedPrecondition, NotFound
from control.secrets import Sealed, SecretBox
from control.storage.db import Conn, Database, fetch_value


@dataclass(frozen=True)
class EnvVar:
    name: str
    secret: bool
    value: str  # "" for secrets unless decrypted for a build
    updated_at: datetime


@dataclass(frozen=True)
class _Stored:
    """A variable's row: a plain ``value``, or a secret sealed under
    ``key_id`` (``nonce``, ``ciphertext``)."""

    project_id: str
    name: str
    secret: bool
    value: str | None
    key_id: str | None
    nonce: bytes | None
    ciphertext: bytes | None
    updated_at: datetime


def _context(project_id: str, name: str) -> str:
    return f"{project_id}/{name}"


class EnvStore:
    def __init__(self, db: Database, box: SecretBox) -> None:
        self.db = db
        self.box = box

    async def set(self, conn: Conn, project_id: str, name: str, value: str, secret: bool) -> EnvVar:
        """Insert or replace a variable; raises ``FailedPrecondition`` past
        the per-project count or without a secret key."""
        others: int = await fetch_value(
            conn,
            "SELECT count(*) FROM project_env WHERE project_id = %s AND name <> %s",
            (project_id, name),
        )
        if others >= MAX_VARS_PER_PROJECT:
            raise FailedPrecondition(f"a project holds at most {MAX_VARS_PER_PROJECT} variables")
        params: tuple[object, ...]
        if secret:
            sealed = self.box.seal(value, _context(project_id, name))
            params = (project_id, name, True, None, sealed.key_id, sealed.nonce, sealed.ciphertext)
        else:
            params = (project_id, name, False, value, None, None, None)
        updated_at: datetime = await fetch_value(
            conn,
            "INSERT INTO project_env (project_id, name, secret, value, key_id, nonce, ciphertext)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (project_id, name) DO UPDATE SET secret = excluded.secret,"
            " value = excluded.value, key_id = excluded.key_id, nonce = excluded.nonce,"
            " ciphertext = excluded.ciphertext, updated_at = now() RETURNING updated_at",
            params,
        )
        return EnvVar(name, secret, "" if secret else value, updated_at)

    async def unset(self, conn: Conn, project_id: str, name: str) -> None:
        cur = await conn.execute(
            "DELETE FROM project_env WHERE project_id = %s AND name = %s RETURNING 1",
            (project_id, name),
        )
        if await cur.fetchone() is None:
            raise NotFound(f"variable {name!r} is not set")

    async def list_for(self, project_id: str) -> list[EnvVar]:
        """Variables with secret values blanked."""
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(EnvVar))
            await cur.execute(
                "SELECT name, secret, CASE WHEN secret THEN '' ELSE coalesce(value, '') END"
                " AS value, updated_at FROM project_env WHERE project_id = %s ORDER BY name",
                (project_id,),
            )
            return await cur.fetchall()

    async def for_build(self, conn: Conn, project_id: str) -> list[EnvVar]:
        """Variables with secrets decrypted, for the build's assignment only."""
        cur = conn.cursor(row_factory=class_row(_Stored))
        await cur.execute(
            "SELECT project_id::text, name, secret, value, key_id, nonce, ciphertext,"
            " updated_at FROM project_env WHERE project_id = %s ORDER BY name",
            (project_id,),
        )
        return [
            EnvVar(v.name, v.secret, self._open(v) if v.secret else v.value or "", v.updated_at)
            for v in await cur.fetchall()
        ]

    def _open(self, stored: _Stored) -> str:
        """The plain value of a stored secret. Raises what ``SecretBox.open``
        raises for a key it lacks or a ciphertext that does not verify."""
        # A secret's row has all three (the table's CHECK); were one missing,
        # the empty stand-in would fail to open like any damaged secret.
        nonce, ciphertext = bytes(stored.nonce or b""), bytes(stored.ciphertext or b"")
        sealed = Sealed(stored.key_id or "", nonce, ciphertext)
        return self.box.open(sealed, _context(stored.project_id, stored.name))

    async def rotate(self, conn: Conn) -> int:
        """Re-encrypt every secret not under the current key in the caller's
        transaction (the rows stay locked until it ends); return how many."""
        count = 0
        cur = conn.cursor(row_factory=class_row(_Stored))
        await cur.execute(
            "SELECT project_id::text, name, secret, value, key_id, nonce, ciphertext,"
            " updated_at FROM project_env WHERE secret AND key_id <> %s FOR UPDATE",
            (self.box.current,),
        )
        for stored in await cur.fetchall():
            sealed = self.box.seal(self._open(stored), _context(stored.project_id, stored.name))
            await conn.execute(
                "UPDATE project_env SET key_id = %s, nonce = %s, ciphertext = %s"
                " WHERE project_id = %s AND name = %s",
                (sealed.key_id, sealed.nonce, sealed.ciphertext, stored.project_id, stored.name),
            )
            count += 1
        return count
