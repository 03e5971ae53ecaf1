"""Project variables: plain values and encrypted secrets."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from control.domain.env import MAX_VARS_PER_PROJECT
from control.errors import FailedPrecondition, NotFound
from control.secrets import Sealed, SecretBox
from control.storage.db import Conn, Database


@dataclass(frozen=True)
class EnvVar:
    name: str
    secret: bool
    value: str  # "" for secrets unless decrypted for a build
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
        cur = await conn.execute(
            "SELECT count(*) FROM project_env WHERE project_id = %s AND name <> %s",
            (project_id, name),
        )
        row = await cur.fetchone()
        if row and row[0] >= MAX_VARS_PER_PROJECT:
            raise FailedPrecondition(f"a project holds at most {MAX_VARS_PER_PROJECT} variables")
        params: tuple[object, ...]
        if secret:
            sealed = self.box.seal(value, _context(project_id, name))
            params = (project_id, name, True, None, sealed.key_id, sealed.nonce, sealed.ciphertext)
        else:
            params = (project_id, name, False, value, None, None, None)
        cur = await conn.execute(
            "INSERT INTO project_env (project_id, name, secret, value, key_id, nonce, ciphertext)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (project_id, name) DO UPDATE SET secret = excluded.secret,"
            " value = excluded.value, key_id = excluded.key_id, nonce = excluded.nonce,"
            " ciphertext = excluded.ciphertext, updated_at = now() RETURNING updated_at",
            params,
        )
        row = await cur.fetchone()
        assert row is not None
        return EnvVar(name, secret, "" if secret else value, row[0])

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
            cur = await conn.execute(
                "SELECT name, secret, coalesce(value, ''), updated_at FROM project_env"
                " WHERE project_id = %s ORDER BY name",
                (project_id,),
            )
            return [EnvVar(r[0], r[1], "" if r[1] else r[2], r[3]) for r in await cur.fetchall()]

    async def for_build(self, conn: Conn, project_id: str) -> list[EnvVar]:
        """Variables with secrets decrypted, for the build's assignment only."""
        cur = await conn.execute(
            "SELECT name, secret, value, key_id, nonce, ciphertext, updated_at FROM project_env"
            " WHERE project_id = %s ORDER BY name",
            (project_id,),
        )
        out = []
        for name, secret, value, kid, nonce, ciphertext, updated in await cur.fetchall():
            if secret:
                value = self.box.open(
                    Sealed(kid, bytes(nonce), bytes(ciphertext)), _context(project_id, name)
                )
            out.append(EnvVar(name, secret, value, updated))
        return out

    async def rotate(self, conn: Conn) -> int:
        """Re-encrypt every secret not under the current key in the caller's
        transaction (the rows stay locked until it ends); return how many."""
        count = 0
        cur = await conn.execute(
            "SELECT project_id, name, key_id, nonce, ciphertext FROM project_env"
            " WHERE secret AND key_id <> %s FOR UPDATE",
            (self.box.current,),
        )
        for project_id, name, kid, nonce, ciphertext in await cur.fetchall():
            context = _context(str(project_id), name)
            plain = self.box.open(Sealed(kid, bytes(nonce), bytes(ciphertext)), context)
            sealed = self.box.seal(plain, context)
            await conn.execute(
                "UPDATE project_env SET key_id = %s, nonce = %s, ciphertext = %s"
                " WHERE project_id = %s AND name = %s",
                (sealed.key_id, sealed.nonce, sealed.ciphertext, project_id, name),
            )
            count += 1
        return count
