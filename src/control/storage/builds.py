"""Builds, their steps and alarms: every SQL statement about them.

Only ``control.builds`` calls the writing methods here, and a status only
through ``Transitions.move``, which checks the move with the pure
``check_transition`` first. A ``Build`` read here carries its dispatch and
stop request, so the lifecycle decides on the row it locked.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import class_row, kwargs_row, scalar_row

from control.domain.build import Build, BuildStatus, Step, StepStatus
from control.errors import NotFound
from control.storage.db import Conn, Database
from control.storage.ids import expand, is_prefix
from control.storage.ids import is_uuid as is_uuid  # older home: callers import it here

# Aliased to the names of ``Build``'s fields, which ``_build`` receives.
_COLUMNS = (
    "b.id::text AS id, b.project_id::text AS project_id, b.account_id::text AS account_id,"
    " b.branch, b.commit_sha, b.status, b.created_at, b.status_reason, b.trigger,"
    " b.retry_of::text AS retry_of, b.production, b.started_at, b.running_at,"
    " b.finished_at, b.runner_id::text AS runner_id, p.name AS project_name, b.warnings,"
    " b.received_at, b.runner_sandbox, b.dispatched_at, b.cancel_requested_at,"
    " b.cancel_status, b.cancel_reason"
)
_FROM = "builds b JOIN projects p ON p.id = b.project_id"


def _build(
    *,
    status: str,
    warnings: list[str],
    cancel_status: str | None,
    cancel_reason: str | None,
    **columns: Any,
) -> Build:
    """A ``Build`` without steps from a row of ``_COLUMNS`` (the row factory
    ``_BUILD``); a column ``Build`` has no field for raises ``TypeError``."""
    return Build(
        status=BuildStatus(status),
        warnings=tuple(warnings),
        cancel_status=BuildStatus(cancel_status) if cancel_status else None,
        cancel_reason=cancel_reason or "",
        **columns,
    )


def _step(*, status: str, **columns: Any) -> Step:
    return Step(status=StepStatus(status), **columns)


_BUILD = kwargs_row(_build)
_STEP = kwargs_row(_step)


@dataclass(frozen=True)
class DueAlarm:
    """An alarm whose time came: the build's ``kind`` deadline, due at
    ``fire_at`` (later than that when no replica could fire it sooner)."""

    build_id: str
    kind: str
    fire_at: datetime


class BuildStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(
        self,
        conn: Conn,
        *,
        project_id: str,
        account_id: str,
        branch: str,
        commit_sha: str,
        trigger: str,
        production: bool,
        step_names: Iterable[str],
        retry_of: str | None = None,
        received_at: datetime | None = None,
    ) -> str:
        build_id = str(uuid.uuid4())
        await conn.execute(
            "INSERT INTO builds (id, project_id, account_id, branch, commit_sha, status,"
            " trigger, production, retry_of, received_at)"
            " VALUES (%s, %s, %s, %s, %s, 'queued', %s, %s, %s, %s)",
            (
                build_id,
                project_id,
                account_id,
                branch,
                commit_sha,
                trigger,
                production,
                retry_of,
                received_at,
            ),
        )
        names = list(step_names)
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO build_steps (build_id, idx, name) VALUES (%s, %s, %s)",
                [(build_id, i, name) for i, name in enumerate(names)],
            )
        return build_id

    async def get(self, account_id: str | None, build_id: str) -> Build:
        """The build ``build_id``: a whole id, or, with an ``account_id``, a
        unique prefix of one of that account's builds (see ``ids.expand``).
        Raises ``NotFound`` for a malformed id, a missing build, or one of
        another account, and ``InvalidArgument("build_id", ...)`` listing the
        candidates for an ambiguous prefix."""
        async with self.db.connection() as conn:
            return await self.get_in(conn, account_id, build_id)

    async def get_in(
        self, conn: Conn, account_id: str | None, build_id: str, *, lock: bool = False
    ) -> Build:
        if account_id is not None and is_prefix(build_id):
            build_id = await expand(
                conn, build_id, table="builds", kind="build", field="build_id",
                scope="account_id = %s", params=(account_id,),
            )  # fmt: skip
        if not is_uuid(build_id):
            raise NotFound(f"build {build_id!r} not found")
        sql = f"SELECT {_COLUMNS} FROM {_FROM} WHERE b.id = %s"
        params: list[object] = [build_id]
        if account_id is not None:
            sql += " AND b.account_id = %s"
            params.append(account_id)
        if lock:
            sql += " FOR UPDATE OF b"
        cur = conn.cursor(row_factory=_BUILD)
        await cur.execute(sql, params)
        build = await cur.fetchone()
        if build is None:
            raise NotFound(f"build {build_id!r} not found")
        steps = conn.cursor(row_factory=_STEP)
        await steps.execute(
            "SELECT name, status, exit_code, started_at, finished_at FROM build_steps"
            " WHERE build_id = %s ORDER BY idx",
            (build_id,),
        )
        return dataclasses.replace(build, steps=tuple(await steps.fetchall()))

    async def get_many_in(self, conn: Conn, build_ids: list[str]) -> list[Build]:
        """The builds (without their steps), in the order of ``build_ids``."""
        if not build_ids:
            return []
        cur = conn.cursor(row_factory=_BUILD)
        await cur.execute(
            f"SELECT {_COLUMNS} FROM {_FROM} WHERE b.id = ANY(%s::uuid[])", (build_ids,)
        )
        found = {b.id: b for b in await cur.fetchall()}
        return [found[b] for b in build_ids if b in found]

    async def list_for(self, account_id: str, project_id: str | None, limit: int) -> list[Build]:
        sql = f"SELECT {_COLUMNS} FROM {_FROM} WHERE b.account_id = %s"
        params: list[object] = [account_id]
        if project_id:
            sql += " AND b.project_id = %s"
            params.append(project_id)
        sql += " ORDER BY b.created_at DESC LIMIT %s"
        params.append(limit)
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=_BUILD)
            await cur.execute(sql, params)
            return await cur.fetchall()

    async def list_page(
        self,
        account_id: str,
        project_id: str | None,
        *,
        branch: str = "",
        status: str = "",
        trigger: str = "",
        before: tuple[datetime, str] | None = None,
        limit: int = 50,
    ) -> list[Build]:
        """The account's builds, newest first, without steps: of one project
        or all, filtered by exact branch, status and trigger when given, and
        older than ``before`` (created_at, id), the key of the last build of
        the previous page. Keyset paging keeps a deep page as cheap as the
        first (the ``builds_project`` index)."""
        sql = f"SELECT {_COLUMNS} FROM {_FROM} WHERE b.account_id = %s"
        params: list[object] = [account_id]
        for column, value in (
            ("b.project_id", project_id),
            ("b.branch", branch),
            ("b.status", status),
            ("b.trigger", trigger),
        ):
            if value:
                sql += f" AND {column} = %s"
                params.append(value)
        if before is not None:
            sql += " AND (b.created_at, b.id) < (%s, %s)"
            params.extend(before)
        sql += " ORDER BY b.created_at DESC, b.id DESC LIMIT %s"
        params.append(limit)
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=_BUILD)
            await cur.execute(sql, params)
            return await cur.fetchall()

    async def last_per_project(self, account_id: str) -> dict[str, Build]:
        """Each of the account's projects' newest build (without steps), by
        project id; projects with no build are absent."""
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=_BUILD)
            await cur.execute(
                f"SELECT DISTINCT ON (b.project_id) {_COLUMNS} FROM {_FROM}"
                " WHERE b.account_id = %s ORDER BY b.project_id, b.created_at DESC, b.id DESC",
                (account_id,),
            )
            return {b.project_id: b for b in await cur.fetchall()}

    async def set_status(
        self,
        conn: Conn,
        build_id: str,
        status: BuildStatus,
        *,
        at: datetime,
        reason: str = "",
    ) -> None:
        """Write a transition the caller has already checked."""
        column = {
            BuildStatus.INITIALIZING: "started_at",
            BuildStatus.RUNNING: "running_at",
        }.get(status, "finished_at" if status.final else None)
        extra = f", {column} = coalesce({column}, %s)" if column else ""
        params: list[object] = [status.value, reason]
        if column:
            params.append(at)
        if status == BuildStatus.RUNNING:
            # A runner may skip the initializing report; keep started_at set.
            extra += ", started_at = coalesce(started_at, %s)"
            params.append(at)
        if status.final:
            extra += ", token_hash = NULL"
        params.append(build_id)
        await conn.execute(
            f"UPDATE builds SET status = %s, status_reason = %s{extra} WHERE id = %s", params
        )

    async def update_step(
        self,
        conn: Conn,
        build_id: str,
        idx: int,
        status: StepStatus,
        exit_code: int | None,
        at: datetime,
    ) -> None:
        started = status == StepStatus.RUNNING
        await conn.execute(
            "UPDATE build_steps SET status = %s,"
            " exit_code = coalesce(%s, exit_code),"
            " started_at = CASE WHEN %s THEN coalesce(started_at, %s) ELSE started_at END,"
            " finished_at = CASE WHEN %s THEN finished_at ELSE coalesce(finished_at, %s) END"
            " WHERE build_id = %s AND idx = %s",
            (status.value, exit_code, started, at, started, at, build_id, idx),
        )

    async def close_open_steps(self, conn: Conn, build_id: str, at: datetime) -> None:
        """Mark steps that never finished: running ones canceled, pending skipped."""
        await conn.execute(
            "UPDATE build_steps SET"
            " status = CASE status WHEN 'running' THEN 'canceled' ELSE 'skipped' END,"
            " finished_at = CASE status WHEN 'running' THEN %s ELSE finished_at END"
            " WHERE build_id = %s AND status IN ('pending', 'running')",
            (at, build_id),
        )

    async def add_warnings(self, conn: Conn, build_id: str, warnings: list[str]) -> None:
        await conn.execute(
            "UPDATE builds SET warnings = warnings || %s::text[] WHERE id = %s"
            " AND NOT warnings @> %s::text[]",
            (warnings, build_id, warnings),
        )

    async def undispatched_on_branch(
        self, conn: Conn, project_id: str, branch: str, except_id: str
    ) -> list[Build]:
        """Lock and return this branch's queued builds that no runner took
        yet (without steps), but ``except_id``. A build being dispatched
        meanwhile is waited for and then left out (its ``dispatched_at`` is
        set once the lock is granted)."""
        cur = conn.cursor(row_factory=_BUILD)
        await cur.execute(
            f"SELECT {_COLUMNS} FROM {_FROM} WHERE b.project_id = %s AND b.branch = %s"
            " AND b.status = 'queued' AND b.dispatched_at IS NULL AND b.id <> %s"
            " ORDER BY b.created_at FOR UPDATE OF b",
            (project_id, branch, except_id),
        )
        return await cur.fetchall()

    async def active_on_branch(self, conn: Conn, project_id: str, branch: str) -> list[str]:
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute(
            "SELECT id::text FROM builds WHERE project_id = %s AND branch = %s"
            " AND (status IN ('initializing', 'running')"
            "      OR (status = 'queued' AND dispatched_at IS NOT NULL))",
            (project_id, branch),
        )
        return await cur.fetchall()

    # --- alarms -----------------------------------------------------------

    async def arm(self, conn: Conn, build_id: str, kind: str, fire_at: datetime) -> None:
        await conn.execute(
            "INSERT INTO alarms (build_id, kind, fire_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (build_id, kind) DO UPDATE SET fire_at = excluded.fire_at",
            (build_id, kind, fire_at),
        )

    async def disarm(self, conn: Conn, build_id: str, kinds: Iterable[str]) -> None:
        await conn.execute(
            "DELETE FROM alarms WHERE build_id = %s AND kind = ANY(%s)", (build_id, list(kinds))
        )

    async def due_alarms(self, conn: Conn, limit: int) -> list[DueAlarm]:
        """Lock and return due alarms; other replicas skip them."""
        cur = conn.cursor(row_factory=class_row(DueAlarm))
        await cur.execute(
            "SELECT build_id::text, kind, fire_at FROM alarms WHERE fire_at <= clock_timestamp()"
            " ORDER BY fire_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        )
        return await cur.fetchall()
