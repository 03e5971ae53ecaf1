"""The queue as the scheduler reads it: every SQL statement of a scheduling
pass (its lock, the slots each account holds, the builds waiting)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from control.storage.db import Conn, fetch_value

_LEADER_KEY = 0x5C4ED  # advisory lock key of the scheduling pass

# A build holds a slot from the moment a runner is picked for it until it is
# final; initializing and running builds always have a runner, so this
# predicate matches the partial index builds_runner.
_ACTIVE_SQL = (
    "SELECT account_id::text, count(*)::int AS builds FROM builds WHERE runner_id IS NOT NULL"
    " AND status IN ('queued', 'initializing', 'running') GROUP BY account_id"
)
# Accounts with waiting builds: their limit and their first ``limit``
# waiting builds, oldest first (more can never start in one pass). The
# queue-depth gauges are read at scrape time (control.storage.stats).
_WAITING_SQL = (
    "SELECT a.id::text AS account_id, a.concurrency_limit AS limit,"
    " q.build_ids, q.queued_at FROM ("
    "  SELECT DISTINCT account_id FROM builds"
    "  WHERE status = 'queued' AND runner_id IS NULL) w"
    " JOIN accounts a ON a.id = w.account_id"
    " CROSS JOIN LATERAL ("
    "  SELECT array_agg(s.id::text ORDER BY s.created_at, s.id) AS build_ids,"
    "         array_agg(s.created_at ORDER BY s.created_at, s.id) AS queued_at FROM ("
    "    SELECT id, created_at FROM builds b WHERE b.account_id = a.id"
    "    AND b.status = 'queued' AND b.runner_id IS NULL"
    "    ORDER BY created_at, id LIMIT a.concurrency_limit) s) q"
)


@dataclass(frozen=True)
class Waiting:
    """An account with builds no runner was picked for: its concurrency
    limit and its first ``limit`` such builds, oldest first, with the time
    each was queued (``build_ids[i]`` at ``queued_at[i]``)."""

    account_id: str
    limit: int
    build_ids: list[str]
    queued_at: list[datetime]


@dataclass(frozen=True)
class _Active:
    account_id: str
    builds: int


async def lead(conn: Conn) -> bool:
    """Take the scheduling pass's lock for the caller's transaction; False
    when another replica's pass holds it (the caller then does nothing)."""
    locked: bool = await fetch_value(conn, "SELECT pg_try_advisory_xact_lock(%s)", (_LEADER_KEY,))
    return locked


async def active(conn: Conn) -> dict[str, int]:
    """Builds holding a slot, by account id (accounts with none are absent)."""
    cur = conn.cursor(row_factory=class_row(_Active))
    await cur.execute(_ACTIVE_SQL)
    return {a.account_id: a.builds for a in await cur.fetchall()}


async def waiting(conn: Conn) -> list[Waiting]:
    """The accounts with waiting builds (see ``Waiting``)."""
    cur = conn.cursor(row_factory=class_row(Waiting))
    await cur.execute(_WAITING_SQL)
    return await cur.fetchall()
