"""Forge deliveries already seen, the push builds a replay must not repeat,
forge events that queued nothing, and the pull-request builds to cancel when
a request closes: every SQL statement about them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg.rows import class_row

from control.storage.db import Conn, Database, fetch_column, fetch_value

# Skipped pushes kept per project: enough to explain a busy day, bounded so
# a noisy repository cannot grow the table without end.
KEEP_PER_PROJECT = 1000


@dataclass(frozen=True)
class SkippedPush:
    id: str
    project_id: str
    project_name: str
    provider: str
    event: str
    ref: str
    branch: str
    commit_sha: str
    reason: str
    delivery_id: str
    received_at: datetime

    @property
    def tag(self) -> str:
        """The tag a tag push or tag deletion names, else ``""`` (its
        ``branch`` is empty: a tag is shown as a tag, not as its ref)."""
        return self.ref.removeprefix("refs/tags/") if self.ref.startswith("refs/tags/") else ""


class PushLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim_delivery(
        self, conn: Conn, provider: str, delivery_id: str, project_id: str
    ) -> bool:
        """Record a delivery id for ``project_id`` in the caller's
        transaction; False when the project recorded it before (a
        redelivery: process nothing).

        GitLab's ``X-Gitlab-Event-UUID`` is the same for every hook one event
        triggers, so an id another project recorded first is this project's
        too: it is stored as ``<project id>:<id>`` then. One project never
        learns or blocks another's deliveries.
        """
        for key in (delivery_id, f"{project_id}:{delivery_id}"):
            cur = await conn.execute(
                "INSERT INTO webhook_deliveries (provider, delivery_id, project_id)"
                " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                (provider, key, project_id),
            )
            if await cur.fetchone() is not None:
                return True
            cur = await conn.execute(
                "SELECT 1 FROM webhook_deliveries"
                " WHERE provider = %s AND delivery_id = %s AND project_id = %s",
                (provider, key, project_id),
            )
            if await cur.fetchone() is not None:
                return False
        # The qualified key names this project, so it cannot be another's.
        raise AssertionError("unreachable: a project-qualified delivery id of another project")

    async def delivery_build(
        self, conn: Conn, provider: str, delivery_id: str, project_id: str
    ) -> str | None:
        """The build a delivery the project recorded queued or was answered
        with, if any."""
        build_id: str | None = await fetch_value(
            conn,
            "SELECT build_id::text FROM webhook_deliveries WHERE provider = %s"
            " AND delivery_id IN (%s, %s) AND project_id = %s AND build_id IS NOT NULL",
            (provider, delivery_id, f"{project_id}:{delivery_id}", project_id),
        )
        return build_id

    async def set_delivery_build(
        self, conn: Conn, provider: str, delivery_id: str, project_id: str, build_id: str
    ) -> None:
        """Remember the build a recorded delivery queued or was answered with."""
        await conn.execute(
            "UPDATE webhook_deliveries SET build_id = %s WHERE provider = %s"
            " AND delivery_id IN (%s, %s) AND project_id = %s",
            (build_id, provider, delivery_id, f"{project_id}:{delivery_id}", project_id),
        )

    async def recent_push_build(
        self, conn: Conn, project_id: str, branch: str, commit_sha: str, window: timedelta
    ) -> str | None:
        """The newest build a push of ``commit_sha`` to ``branch`` queued
        within ``window``, else None.

        Takes a transaction-level lock on (project, branch, commit) first, so
        a concurrent delivery of the same push waits for the caller's
        transaction to commit and then finds its build: call it in the
        transaction that queues the build.
        """
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"push:{project_id}:{branch}:{commit_sha}",),
        )
        build_id: str | None = await fetch_value(
            conn,
            "SELECT id::text FROM builds WHERE project_id = %s AND branch = %s"
            " AND commit_sha = %s AND trigger = 'push' AND created_at > clock_timestamp() - %s"
            " ORDER BY created_at DESC LIMIT 1",
            (project_id, branch, commit_sha, window),
        )
        return build_id

    async def record_skip(
        self,
        conn: Conn,
        *,
        project_id: str,
        account_id: str,
        provider: str,
        event: str,
        ref: str,
        branch: str,
        commit_sha: str,
        reason: str,
        delivery_id: str,
    ) -> str:
        """Record a push that did not build (in the caller's transaction);
        return its id. Drops the project's oldest records past
        ``KEEP_PER_PROJECT``."""
        skip_id = str(uuid.uuid4())
        await conn.execute(
            "INSERT INTO skipped_pushes (id, project_id, account_id, provider, event, ref,"
            " branch, commit_sha, reason, delivery_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                skip_id,
                project_id,
                account_id,
                provider,
                event,
                ref[:512],
                branch,
                commit_sha,
                reason,
                delivery_id,
            ),
        )
        await conn.execute(
            "DELETE FROM skipped_pushes WHERE id IN (SELECT id FROM skipped_pushes"
            " WHERE project_id = %s ORDER BY received_at DESC OFFSET %s)",
            (project_id, KEEP_PER_PROJECT),
        )
        return skip_id

    async def skipped(
        self, account_id: str, project_id: str | None, limit: int
    ) -> list[SkippedPush]:
        """The account's newest skipped pushes (of one project, or all)."""
        sql = (
            "SELECT s.id::text, s.project_id::text, p.name AS project_name, s.provider, s.event,"
            " s.ref, s.branch,"
            " s.commit_sha, s.reason, s.delivery_id, s.received_at"
            " FROM skipped_pushes s JOIN projects p ON p.id = s.project_id"
            " WHERE s.account_id = %s"
        )
        params: list[object] = [account_id]
        if project_id:
            sql += " AND s.project_id = %s"
            params.append(project_id)
        sql += " ORDER BY s.received_at DESC LIMIT %s"
        params.append(limit)
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(SkippedPush))
            await cur.execute(sql, params)
            return await cur.fetchall()

    async def record_pull_request_build(
        self, conn: Conn, build_id: str, project_id: str, number: int, *, fork: bool
    ) -> None:
        """Remember that ``build_id`` builds request ``number`` (in the
        transaction that queued it), and whether the request's head is in
        another repository (``fork``: its builds and their retries get no
        secrets unless the project opts in)."""
        await conn.execute(
            "INSERT INTO pull_request_builds (build_id, project_id, number, fork)"
            " VALUES (%s, %s, %s, %s)",
            (build_id, project_id, number, fork),
        )

    async def is_fork_build(self, conn: Conn, build_id: str) -> bool:
        """Whether ``build_id`` builds a pull request from another repository."""
        fork: bool | None = await fetch_value(
            conn, "SELECT fork FROM pull_request_builds WHERE build_id = %s", (build_id,)
        )
        return bool(fork)

    async def open_pull_request_builds(self, conn: Conn, project_id: str, number: int) -> list[str]:
        """Builds of request ``number`` that are queued or running."""
        return await fetch_column(
            conn,
            "SELECT b.id::text FROM pull_request_builds r JOIN builds b ON b.id = r.build_id"
            " WHERE r.project_id = %s AND r.number = %s"
            " AND b.status IN ('queued', 'initializing', 'running') ORDER BY b.created_at",
            (project_id, number),
        )
