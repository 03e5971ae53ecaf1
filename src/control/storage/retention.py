"""Retention's SQL: which old rows may go, and deleting them in small batches.

Every function runs one short statement on the caller's connection, which
must be in autocommit mode (each batch commits on its own, so no
transaction holds row locks or an old snapshot for long). Each raises
psycopg errors unchanged.

A build may go only when it is final, ended before the cutoff, is not one of
the newest ``keep`` builds of its (project, branch), and no build that is
still queued or running retries it. The predicate is checked again by every
statement that deletes, so a retry queued meanwhile keeps its build.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from psycopg.abc import Params, QueryNoTemplate
from psycopg.rows import class_row

from control.domain.build import FINAL_STATES
from control.storage.db import Conn, fetch_value

# The session-level advisory lock that makes one replica at a time collect
# (migrate.py uses 0x0C0FFEE).
LOCK_KEY = 0x0C0FFEF
# Where the walk over old builds starts.
START = (datetime(1, 1, 1, tzinfo=UTC), str(uuid.UUID(int=0)))
TABLES = ("log_chunks", "builds", "webhook_deliveries", "skipped_pushes", "audit_log")

_FINAL = "(" + ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATES)) + ")"
# A build that may be deleted (``b``): final and no live retry.
_MAY_GO = (
    f"b.status IN {_FINAL} AND NOT EXISTS (SELECT 1 FROM builds r"
    f" WHERE r.retry_of = b.id AND r.status NOT IN {_FINAL})"
)

_WINDOW_SQL = f"""
WITH win AS (
    SELECT id, project_id, branch, status, created_at, finished_at FROM builds
    WHERE created_at < %(cutoff)s AND (created_at, id) > (%(at)s, %(id)s::uuid)
    ORDER BY created_at, id LIMIT %(window)s
)
SELECT b.id::text, b.created_at,
    ({_MAY_GO} AND coalesce(b.finished_at, b.created_at) < %(cutoff)s
    AND (%(keep)s = 0 OR EXISTS (
        SELECT 1 FROM builds n
        WHERE n.project_id = b.project_id AND n.branch = b.branch
          AND (n.created_at, n.id) > (b.created_at, b.id)
        OFFSET greatest(%(keep)s - 1, 0) LIMIT 1))) AS may_go
FROM win b ORDER BY b.created_at, b.id
"""

_CHUNKS_SQL = f"""
WITH gone AS (
    DELETE FROM log_chunks c WHERE (c.build_id, c.first_line) IN (
        SELECT k.build_id, k.first_line FROM log_chunks k JOIN builds b ON b.id = k.build_id
        WHERE k.build_id = ANY(%(ids)s::uuid[]) AND {_MAY_GO}
        LIMIT %(limit)s)
    -- The text as stored (compressed or not) plus the row's header and keys.
    RETURNING pg_column_size(c.data) + 40 AS size
)
SELECT count(*) AS rows, coalesce(sum(size), 0) AS bytes FROM gone
"""

_BUILDS_SQL = f"""
WITH gone AS (
    DELETE FROM builds b WHERE b.id = ANY(%(ids)s::uuid[]) AND {_MAY_GO}
    RETURNING pg_column_size(b.*) AS size
)
SELECT count(*) AS rows, coalesce(sum(size), 0) AS bytes FROM gone
"""

# Table, its key columns, its time column: rows older than the cutoff go,
# oldest first.
_BY_AGE = {
    "webhook_deliveries": ("provider, delivery_id", "received_at"),
    "skipped_pushes": ("id", "received_at"),
    "audit_log": ("id", "at"),
}


@dataclass(frozen=True)
class Deleted:
    """Rows one statement deleted and their approximate stored bytes."""

    rows: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Window:
    """One step of the walk over builds older than the cutoff: the ids that
    may go, and where the next step starts (``None``: the walk is over)."""

    deletable: list[str]
    next_start: tuple[datetime, str] | None


@dataclass(frozen=True)
class _Candidate:
    """A build of the walk's window; ``may_go``: it may be deleted."""

    id: str
    created_at: datetime
    may_go: bool


@dataclass(frozen=True)
class _TableSize:
    name: str
    bytes: int


async def try_lock(conn: Conn) -> bool:
    """Take the collection lock for this session; False when another
    session holds it. The caller releases it with ``unlock`` (or by closing
    the connection)."""
    locked: bool = await fetch_value(conn, "SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
    return locked


async def unlock(conn: Conn) -> None:
    await conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


async def bound_session(conn: Conn, statement_ms: int, lock_ms: int) -> None:
    """No statement of this session runs longer than ``statement_ms`` or
    waits longer than ``lock_ms`` for a row another transaction holds (a
    build being written to gives way to nothing)."""
    await conn.execute(f"SET statement_timeout = {int(statement_ms)}")
    await conn.execute(f"SET lock_timeout = {int(lock_ms)}")


async def database_now(conn: Conn) -> datetime:
    now: datetime = await fetch_value(conn, "SELECT now()")
    return now


async def old_builds(
    conn: Conn, cutoff: datetime, keep: int, start: tuple[datetime, str], window: int
) -> Window:
    """Look at the next ``window`` builds created before ``cutoff`` after
    ``start`` (in (created_at, id) order) and return those that may go."""
    cur = conn.cursor(row_factory=class_row(_Candidate))
    await cur.execute(
        _WINDOW_SQL,
        {"cutoff": cutoff, "at": start[0], "id": start[1], "window": window, "keep": keep},
    )
    builds = await cur.fetchall()
    deletable = [b.id for b in builds if b.may_go]
    last = (builds[-1].created_at, builds[-1].id) if len(builds) == window else None
    return Window(deletable, last)


async def delete_log_chunks(conn: Conn, build_ids: list[str], limit: int) -> Deleted:
    """Delete up to ``limit`` log chunks of those of ``build_ids`` that may
    still go; fewer than ``limit`` rows means none is left."""
    return await _deleted(conn, _CHUNKS_SQL, {"ids": build_ids, "limit": limit})


async def delete_builds(conn: Conn, build_ids: list[str]) -> Deleted:
    """Delete the builds of ``build_ids`` that may still go, with their
    steps, alarms and remaining chunks (ON DELETE CASCADE)."""
    return await _deleted(conn, _BUILDS_SQL, {"ids": build_ids})


async def delete_older(conn: Conn, table: str, cutoff: datetime, limit: int) -> Deleted:
    """Delete up to ``limit`` of the oldest rows of ``table``
    (``webhook_deliveries``, ``skipped_pushes`` or ``audit_log``) from
    before ``cutoff``; fewer than ``limit`` means none is left."""
    key, at = _BY_AGE[table]
    return await _deleted(
        conn,
        f"WITH gone AS (DELETE FROM {table} t WHERE ({key}) IN ("
        f" SELECT {key} FROM {table} WHERE {at} < %s ORDER BY {at} LIMIT %s)"
        " RETURNING pg_column_size(t.*) AS size)"
        " SELECT count(*) AS rows, coalesce(sum(size), 0) AS bytes FROM gone",
        (cutoff, limit),
    )


async def table_bytes(conn: Conn) -> dict[str, int]:
    """On-disk size of each table in ``TABLES``, indexes and TOAST included."""
    cur = conn.cursor(row_factory=class_row(_TableSize))
    await cur.execute(
        "SELECT t AS name, coalesce(pg_total_relation_size(to_regclass(t)), 0) AS bytes"
        " FROM unnest(%s::text[]) t",
        (list(TABLES),),
    )
    return {t.name: t.bytes for t in await cur.fetchall()}


async def _deleted(conn: Conn, query: QueryNoTemplate, params: Params) -> Deleted:
    """Run a ``WITH gone AS (DELETE ...) SELECT count(*) AS rows, ... AS
    bytes`` statement; an aggregate returns its one row even when nothing
    went."""
    cur = conn.cursor(row_factory=class_row(Deleted))
    await cur.execute(query, params)
    return await cur.fetchone() or Deleted()
