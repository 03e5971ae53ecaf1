"""Cluster-wide build counts for ``/metrics``, read from PostgreSQL.

These are facts about the whole installation, not about one process, so
every replica reads the same numbers from the database at scrape time instead
of keeping gauges that drift when a replica restarts or another replica
handles the transition.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg.rows import class_row

from control.storage.db import Conn, fetch_value

# Initializing and running builds always have a runner, so these predicates
# match the partial index builds_runner; waiting builds use builds_queued.
_ACTIVE_SQL = (
    "SELECT count(*) FROM builds"
    " WHERE runner_id IS NOT NULL AND status IN ('initializing', 'running')"
)
_WAITING_SQL = (
    "SELECT account_id::text, count(*) AS waiting,"
    " extract(epoch FROM now() - min(created_at))::float8 AS oldest_seconds"
    " FROM builds WHERE status = 'queued' AND runner_id IS NULL GROUP BY account_id"
)


@dataclass(frozen=True)
class _Waiting:
    account_id: str
    waiting: int
    oldest_seconds: float


@dataclass(frozen=True)
class BuildCounts:
    """``active``: builds initializing or running. ``waiting``: queued builds
    no runner was picked for yet, by account id (accounts with none are
    absent). ``oldest_waiting_seconds``: age of the oldest of them, 0 when
    none waits."""

    active: int
    waiting: dict[str, int]
    oldest_waiting_seconds: float


async def build_counts(conn: Conn) -> BuildCounts:
    """Read the counts; two index scans. Raises psycopg errors unchanged
    (callers use ``Database.connection()``, which translates them)."""
    active: int = await fetch_value(conn, _ACTIVE_SQL)
    cur = conn.cursor(row_factory=class_row(_Waiting))
    await cur.execute(_WAITING_SQL)
    accounts = await cur.fetchall()
    return BuildCounts(
        active=active,
        waiting={a.account_id: a.waiting for a in accounts},
        oldest_waiting_seconds=max((a.oldest_seconds for a in accounts), default=0.0),
    )
