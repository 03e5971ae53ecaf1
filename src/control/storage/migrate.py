"""Apply the ordered SQL migrations in ``migrations/`` and record them.

Safe to run twice and from several replicas at once: the whole run holds a
transaction-level advisory lock, and each file is applied in the same
transaction as its row in ``schema_migrations``.
"""

from __future__ import annotations

import logging
from importlib import resources

from control.storage.db import Conn, fetch_column, fetch_value

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every replica.
_LOCK_KEY = 0x0C0FFEE


def migration_files() -> list[tuple[str, str]]:
    """Return (version, sql) for every migration, in order."""
    folder = resources.files("control.storage") / "migrations"
    entries = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name.removesuffix(".sql"), p.read_text()) for p in entries]


async def migrate(conn: Conn) -> list[str]:
    """Apply every migration not yet recorded; return the versions applied.

    ``conn`` must be in autocommit mode; raises psycopg errors unchanged.
    """
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = set(await fetch_column(conn, "SELECT version FROM schema_migrations"))
        for version, sql in migration_files():
            if version in done:
                continue
            log.info("applying migration %s", version)
            await conn.execute(sql.encode())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied.append(version)
    return applied


async def pending(conn: Conn) -> list[str]:
    """Return the versions not yet applied (for /readyz)."""
    if not await fetch_value(conn, "SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return [v for v, _ in migration_files()]
    done = set(await fetch_column(conn, "SELECT version FROM schema_migrations"))
    return [v for v, _ in migration_files() if v not in done]
