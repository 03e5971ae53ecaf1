"""Builds and the runners that hold them: assignment, dispatch, stop
requests and the pull-request link a dispatch reads.

Every method takes the caller's connection: the lifecycle (``builds/``)
decides, in its own transaction, and this module only reads and writes
rows. Methods that lock say so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row, kwargs_row, scalar_row

from control.domain.build import BuildStatus
from control.storage.accounts import hash_token
from control.storage.db import Conn


@dataclass(frozen=True)
class Held:
    """A build a runner was given, by id and status."""

    id: str
    status: BuildStatus


def _held(*, id: str, status: str) -> Held:
    return Held(id, BuildStatus(status))


@dataclass(frozen=True)
class PullRequestLink:
    number: int
    fork: bool


@dataclass(frozen=True)
class _PullRequestRow:
    build_id: str
    number: int
    fork: bool


@dataclass(frozen=True)
class StopToSend:
    """A stop to send a runner: the build and why."""

    build_id: str
    reason: str


async def notify(conn: Conn, channel: str, payload: str) -> None:
    """NOTIFY ``channel`` when the caller's transaction commits."""
    await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


class AssignmentStore:
    """SQL of the build ↔ runner relation; stateless."""

    async def lock_placeable(self, conn: Conn, build_ids: list[str]) -> list[str]:
        """Lock and return, oldest first, those of ``build_ids`` still queued
        and held by no runner. Rows another transaction holds are skipped:
        a concurrent placement has them."""
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute(
            "SELECT id::text FROM builds WHERE id = ANY(%s::uuid[]) AND status = 'queued'"
            " AND runner_id IS NULL ORDER BY created_at FOR NO KEY UPDATE SKIP LOCKED",
            (build_ids,),
        )
        return await cur.fetchall()

    async def assign(self, conn: Conn, placed: dict[str, str], startup_by: datetime) -> None:
        """Give each build of ``placed`` ({build id: runner id}) to its runner
        and arm its startup alarm at ``startup_by``."""
        ids, runners = list(placed), list(placed.values())
        await conn.execute(
            "UPDATE builds b SET runner_id = x.runner_id, assigned_at = now()"
            " FROM unnest(%s::uuid[], %s::uuid[]) AS x(id, runner_id) WHERE b.id = x.id",
            (ids, runners),
        )
        await conn.execute(
            "INSERT INTO alarms (build_id, kind, fire_at)"
            " SELECT id, 'startup', %s FROM unnest(%s::uuid[]) AS id"
            " ON CONFLICT (build_id, kind) DO UPDATE SET fire_at = excluded.fire_at",
            (startup_by, ids),
        )

    async def lock_undispatched(self, conn: Conn, runner_id: str) -> list[str]:
        """Lock and return, oldest first, the queued builds given to the
        runner and not yet sent to it."""
        # NO KEY UPDATE: a row some insert merely references (a foreign
        # key's KEY SHARE lock: alarms, log chunks, commit-status rows)
        # must not be skipped, or its assignment waits for the recheck.
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute(
            "SELECT id::text FROM builds WHERE runner_id = %s AND status = 'queued'"
            " AND dispatched_at IS NULL ORDER BY created_at FOR NO KEY UPDATE SKIP LOCKED",
            (runner_id,),
        )
        return await cur.fetchall()

    async def pull_requests(self, conn: Conn, build_ids: list[str]) -> dict[str, PullRequestLink]:
        """The pull request each of ``build_ids`` builds, for those that do."""
        cur = conn.cursor(row_factory=class_row(_PullRequestRow))
        await cur.execute(
            "SELECT build_id::text, number, fork FROM pull_request_builds"
            " WHERE build_id = ANY(%s::uuid[])",
            (build_ids,),
        )
        return {row.build_id: PullRequestLink(row.number, row.fork) for row in await cur.fetchall()}

    async def link_retry(self, conn: Conn, build_id: str, retry_of: str) -> None:
        """A retry of a pull request's build is that request's too: its
        close cancels it, and its cache scope stays the request's."""
        await conn.execute(
            "INSERT INTO pull_request_builds (build_id, project_id, number, fork)"
            " SELECT %s, project_id, number, fork FROM pull_request_builds"
            " WHERE build_id = %s",
            (build_id, retry_of),
        )

    async def mark_dispatched(self, conn: Conn, tokens: dict[str, str]) -> None:
        """Record that each build of ``tokens`` ({build id: token}) was sent,
        storing only its token's hash."""
        await conn.execute(
            "UPDATE builds b SET dispatched_at = now(), token_hash = x.hash"
            " FROM unnest(%s::uuid[], %s::bytea[]) AS x(id, hash) WHERE b.id = x.id",
            (list(tokens), [hash_token(t) for t in tokens.values()]),
        )

    async def take_stops(self, conn: Conn, runner_id: str) -> list[StopToSend]:
        """The stops the runner was not yet sent, marked sent."""
        cur = conn.cursor(row_factory=class_row(StopToSend))
        await cur.execute(
            "UPDATE builds SET cancel_sent_at = now() WHERE runner_id = %s"
            " AND cancel_requested_at IS NOT NULL AND cancel_sent_at IS NULL"
            " AND dispatched_at IS NOT NULL"
            " RETURNING id::text AS build_id, coalesce(cancel_reason, '') AS reason",
            (runner_id,),
        )
        return await cur.fetchall()

    async def unassign(self, conn: Conn, build_id: str, runner_id: str | None = None) -> None:
        """Put a queued build back in the queue (of ``runner_id`` only, when
        given), forgetting its runner and token."""
        await conn.execute(
            "UPDATE builds SET runner_id = NULL, assigned_at = NULL, dispatched_at = NULL,"
            " token_hash = NULL WHERE id = %s AND status = 'queued'"
            " AND (%s::uuid IS NULL OR runner_id = %s::uuid)",
            (build_id, runner_id, runner_id),
        )

    async def request_stop(
        self, conn: Conn, build_id: str, status: BuildStatus | None, reason: str
    ) -> None:
        """Ask the build's runner to stop it; the first request's state and
        reason win, and the stop is (re)sent on the runner's stream."""
        await conn.execute(
            "UPDATE builds SET cancel_requested_at = coalesce(cancel_requested_at, now()),"
            " cancel_status = coalesce(cancel_status, %s),"
            " cancel_reason = coalesce(cancel_reason, %s), cancel_sent_at = NULL"
            " WHERE id = %s",
            (status.value if status else None, reason, build_id),
        )

    async def lock_held(self, conn: Conn, runner_id: str, *, dispatched: bool) -> list[Held]:
        """Lock and return the unfinished builds the runner holds (only those
        sent to it, with ``dispatched``)."""
        cur = conn.cursor(row_factory=kwargs_row(_held))
        await cur.execute(
            "SELECT id::text, status FROM builds WHERE runner_id = %s"
            " AND (NOT %s OR dispatched_at IS NOT NULL)"
            " AND status IN ('queued', 'initializing', 'running') FOR UPDATE",
            (runner_id, dispatched),
        )
        return await cur.fetchall()

    async def stop_ended(self, conn: Conn, runner_id: str, build_ids: Iterable[str]) -> None:
        """Of ``build_ids`` (builds a reconnecting runner still runs), ask it
        again to stop those that ended here meanwhile or were asked to stop."""
        await conn.execute(
            "UPDATE builds SET cancel_requested_at = coalesce(cancel_requested_at, now()),"
            " cancel_reason = coalesce(cancel_reason, 'the build already ended'),"
            " cancel_sent_at = NULL WHERE runner_id = %s AND id = ANY(%s::uuid[])"
            " AND (cancel_requested_at IS NOT NULL"
            "      OR status NOT IN ('queued', 'initializing', 'running'))",
            (runner_id, list(build_ids)),
        )

    async def run_timeout(self, conn: Conn, project_id: str) -> int | None:
        """The project's run timeout in seconds (None: the project is gone)."""
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute("SELECT run_timeout_seconds FROM projects WHERE id = %s", (project_id,))
        timeout: int | None = await cur.fetchone()
        return timeout
