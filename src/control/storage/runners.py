"""Runners and their slots: every SQL statement about them."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg.rows import class_row

from control.domain.runner import AccountQueue, RunnerInfo
from control.storage.db import Conn, Database, fetch_column, fetch_value

# A build holds a slot from assignment until it is final.
_BUSY = (
    "(SELECT count(*) FROM builds b WHERE b.runner_id = r.id"
    " AND b.status IN ('queued', 'initializing', 'running'))"
)


@dataclass(frozen=True)
class _Free:
    runner_id: str
    slots: int


@dataclass(frozen=True)
class _Slots:
    capacity: int
    busy: int


class RunnerStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def register(
        self,
        runner_id: str,
        name: str,
        capacity: int,
        labels: list[str],
        launcher: str,
        session_id: str,
        sandbox: str = "",
    ) -> None:
        """Record the runner and its new stream (``session_id``), which
        supersedes any older stream of the same runner. ``sandbox`` is the
        isolation it says it gives builds; builds assigned to it from now
        on record it (a trigger, see migration 0012)."""
        async with self.db.connection() as conn:
            await conn.execute(
                "INSERT INTO runners (id, name, capacity, labels, launcher, connected,"
                " connected_at, last_seen_at, session_id, sandbox)"
                " VALUES (%s, %s, %s, %s, %s, true, now(), now(), %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
                " capacity = excluded.capacity, labels = excluded.labels,"
                " launcher = excluded.launcher, connected = true, connected_at = now(),"
                " last_seen_at = now(), session_id = excluded.session_id,"
                " sandbox = excluded.sandbox",
                (runner_id, name, capacity, labels, launcher, session_id, sandbox),
            )

    async def current_session(self, conn: Conn, runner_id: str) -> str | None:
        """The runner's current stream. Not locked: a reconnect racing a
        dispatch at worst lets the older stream send one last assignment,
        which the runner, gone from it, never acknowledges (the startup
        deadline then recovers it); a row lock here would make every start
        wait for dispatches."""
        session: str | None = await fetch_value(
            conn, "SELECT session_id::text FROM runners WHERE id = %s", (runner_id,)
        )
        return session

    async def heartbeat(self, runner_id: str, *, draining: bool = False) -> None:
        """The runner is alive; a draining runner gets no new builds (its
        capacity drops to 0 until it says hello again)."""
        async with self.db.connection() as conn:
            await conn.execute(
                "UPDATE runners SET last_seen_at = now(), connected = true,"
                " capacity = CASE WHEN %s THEN 0 ELSE capacity END WHERE id = %s",
                (draining, runner_id),
            )

    async def disconnected(self, runner_id: str, session_id: str) -> None:
        """The stream closed. Builds stay with the runner until it comes back
        or the reaper declares it lost. A superseded stream changes nothing."""
        async with self.db.connection() as conn:
            await conn.execute(
                "UPDATE runners SET connected = false WHERE id = %s AND session_id = %s",
                (runner_id, session_id),
            )

    async def lock_free(self, conn: Conn, alive_seconds: float) -> dict[str, int]:
        """Lock every live runner with a free slot (in id order, so two
        callers never deadlock) and return its free slots, counted after the
        locks were granted. The caller assigns in the same transaction."""
        ids = await fetch_column(
            conn,
            "SELECT r.id FROM runners r WHERE r.connected"
            " AND r.last_seen_at > now() - make_interval(secs => %s)"
            " ORDER BY r.id FOR UPDATE OF r",
            (alive_seconds,),
        )
        if not ids:
            return {}
        # A new statement: it sees assignments committed while we waited.
        cur = conn.cursor(row_factory=class_row(_Free))
        await cur.execute(
            f"SELECT r.id::text AS runner_id, (r.capacity - {_BUSY})::int AS slots"
            " FROM runners r WHERE r.id = ANY(%s)",
            (ids,),
        )
        return {r.runner_id: r.slots for r in await cur.fetchall() if r.slots > 0}

    async def free_slots(self, conn: Conn, alive_seconds: float) -> tuple[int, int]:
        """Return (capacity, busy) summed over live runners."""
        cur = conn.cursor(row_factory=class_row(_Slots))
        await cur.execute(
            f"SELECT coalesce(sum(r.capacity), 0)::int AS capacity,"
            f" coalesce(sum({_BUSY}), 0)::int AS busy FROM runners r"
            f" WHERE r.connected AND r.last_seen_at > now() - make_interval(secs => %s)",
            (alive_seconds,),
        )
        slots = await cur.fetchone()
        assert slots is not None  # an aggregate without GROUP BY returns one row
        return slots.capacity, slots.busy

    async def lost(self, conn: Conn, lost_after_seconds: float) -> list[str]:
        """Lock and return runners silent for longer than the bound that still
        hold builds. None while the database server itself has been up for
        less than the bound: heartbeats could not land while it was down."""
        return await fetch_column(
            conn,
            f"SELECT r.id::text FROM runners r"
            f" WHERE r.last_seen_at < now() - make_interval(secs => %s)"
            f" AND pg_postmaster_start_time() < now() - make_interval(secs => %s)"
            f" AND {_BUSY} > 0 FOR UPDATE OF r SKIP LOCKED",
            (lost_after_seconds, lost_after_seconds),
        )

    async def disconnect(self, conn: Conn, runner_id: str) -> None:
        """Mark a lost runner disconnected (its row stays: the id is kept)."""
        await conn.execute("UPDATE runners SET connected = false WHERE id = %s", (runner_id,))

    async def list_all(self) -> list[RunnerInfo]:
        """Every registered runner, connected ones first, then by name. A
        draining runner reports capacity 0 in its heartbeats (see
        ``heartbeat``), so a connected runner with no capacity is draining."""
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(RunnerInfo))
            await cur.execute(
                f"SELECT r.id::text AS id, r.name, r.labels, r.launcher, r.capacity,"
                f" {_BUSY}::int AS busy, r.connected, (r.connected AND r.capacity = 0) AS draining,"
                f" r.connected_at, r.last_seen_at, r.sandbox"
                f" FROM runners r ORDER BY r.connected DESC, r.name, r.id"
            )
            return await cur.fetchall()

    async def queues(self, account_id: str | None) -> list[AccountQueue]:
        """Queue depth per account (one account, or all when ``None``)."""
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(AccountQueue))
            await cur.execute(
                "SELECT a.id::text AS account_id, a.concurrency_limit AS limit,"
                " (count(*) FILTER (WHERE b.status = 'queued' AND b.runner_id IS NULL))::int"
                " AS queued,"
                " (count(*) FILTER (WHERE b.status IN ('initializing', 'running')"
                "   OR (b.status = 'queued' AND b.runner_id IS NOT NULL)))::int AS active"
                " FROM accounts a LEFT JOIN builds b ON b.account_id = a.id"
                " AND b.status IN ('queued', 'initializing', 'running')"
                " WHERE %s::uuid IS NULL OR a.id = %s::uuid GROUP BY a.id ORDER BY a.id",
                (account_id, account_id),
            )
            return await cur.fetchall()
