"""The commit statuses sent to forges: every SQL statement about them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from control.storage.db import Database, fetch_value


@dataclass(frozen=True)
class StatusReport:
    """The last commit status Conveyor tried to send for a build, in the
    forge's words; ``delivered_at`` is None while it has not arrived, and
    ``last_error`` says why."""

    build_id: str
    forge: str
    state: str
    description: str
    delivered_at: datetime | None
    attempts: int
    last_error: str


class ForgeReportStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, build_id: str) -> StatusReport | None:
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=class_row(StatusReport))
            await cur.execute(
                "SELECT build_id::text, forge, state, description, delivered_at, attempts,"
                " last_error FROM forge_status_reports WHERE build_id = %s",
                (build_id,),
            )
            return await cur.fetchone()

    async def save(
        self,
        build_id: str,
        forge: str,
        state: str,
        description: str,
        *,
        delivered: bool,
        attempts: int,
        error: str = "",
    ) -> None:
        """Record the outcome of sending ``state`` for a build."""
        async with self.db.connection() as conn:
            await conn.execute(
                "INSERT INTO forge_status_reports (build_id, forge, state, description,"
                " delivered_at, attempts, last_error)"
                " VALUES (%s, %s, %s, %s, CASE WHEN %s THEN now() END, %s, %s)"
                " ON CONFLICT (build_id) DO UPDATE SET forge = excluded.forge,"
                " state = excluded.state, description = excluded.description,"
                " delivered_at = excluded.delivered_at, attempts = excluded.attempts,"
                " last_error = excluded.last_error, updated_at = now()",
                (build_id, forge, state, description, delivered, attempts, error[:1000]),
            )

    async def newer_build_of_commit(self, build_id: str) -> bool:
        """True when the build's project has a newer build of the same
        commit: that build owns the commit's status from then on."""
        async with self.db.connection() as conn:
            newer: bool = await fetch_value(
                conn,
                "SELECT EXISTS (SELECT 1 FROM builds n JOIN builds b"
                " ON n.project_id = b.project_id AND n.commit_sha = b.commit_sha"
                " WHERE b.id = %s AND n.id <> b.id AND n.created_at > b.created_at)",
                (build_id,),
            )
        return newer
