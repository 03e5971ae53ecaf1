"""Projects: every SQL statement about them."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import asdict
from typing import Any

from psycopg.rows import kwargs_row, scalar_row

from control.domain import project_fields
from control.domain.project import Project, ProjectSettings
from control.errors import FailedPrecondition, NotFound
from control.storage.db import Conn, Database
from control.storage.ids import expand, is_prefix, is_uuid

# Ids as text, so a row holds only what ``Project`` holds but tuples.
_COLUMNS = ", ".join(
    f"{f.name}::text AS {f.name}" if f.kind == "id" else f.name for f in project_fields.FIELDS
)
UPDATABLE = project_fields.UPDATABLE


def _project(**row: Any) -> Project:
    """A ``projects`` row (``_COLUMNS``) as a ``Project``: arrays become
    tuples."""
    for f in project_fields.FIELDS:
        if f.kind in ("globs", "list"):
            row[f.name] = tuple(row[f.name])
    return Project(**row)


_PROJECT = kwargs_row(_project)


def _sql_value(value: object) -> object:
    """psycopg adapts lists, not tuples, to arrays."""
    return list(value) if isinstance(value, tuple) else value


class ProjectStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, conn: Conn, account_id: str, settings: ProjectSettings) -> Project:
        """Insert a project in the caller's transaction; raises
        ``AlreadyExists`` for a taken name (when the statement runs inside
        ``Database.transaction``, which translates the unique violation)."""
        values = {k: _sql_value(v) for k, v in asdict(settings).items()}
        cur = conn.cursor(row_factory=_PROJECT)
        await cur.execute(
            f"INSERT INTO projects (id, account_id, webhook_secret, {', '.join(values)})"
            f" VALUES (%s, %s, %s, {', '.join(['%s'] * len(values))})"
            f" RETURNING {_COLUMNS}",
            (uuid.uuid4(), account_id, secrets.token_hex(24), *values.values()),
        )
        project = await cur.fetchone()
        assert project is not None
        return project

    async def get(self, account_id: str | None, ref: str) -> Project:
        """Find a project by id or name within an account (None: any account,
        for webhooks and runners). Raises ``NotFound``."""
        async with self.db.connection() as conn:
            return await self.get_in(conn, account_id, ref)

    async def get_in(self, conn: Conn, account_id: str | None, ref: str) -> Project:
        """``ref`` is an id, a name, or (with an ``account_id``) a unique
        prefix of the id of one of the account's projects; a name wins over
        a prefix it happens to look like. Raises ``NotFound``, or
        ``InvalidArgument("project", ...)`` for an ambiguous prefix."""
        project = await self._find(conn, account_id, ref)
        if project is None and account_id is not None and is_prefix(ref):
            full = await expand(
                conn, ref, table="projects", kind="project", field="project",
                scope="account_id = %s", params=(account_id,),
            )  # fmt: skip
            project = await self._find(conn, account_id, full)
        if project is None:
            raise NotFound(f"project {ref!r} not found")
        return project

    async def _find(self, conn: Conn, account_id: str | None, ref: str) -> Project | None:
        """The project with id or name ``ref``, or None."""
        clauses, params = [], []
        if is_uuid(ref):
            clauses.append("id = %s")
            params.append(ref)
        else:
            clauses.append("name = %s")
            params.append(ref)
            if account_id is None:
                return None
        if account_id is not None:
            clauses.append("account_id = %s")
            params.append(account_id)
        cur = conn.cursor(row_factory=_PROJECT)
        await cur.execute(f"SELECT {_COLUMNS} FROM projects WHERE {' AND '.join(clauses)}", params)
        return await cur.fetchone()

    async def list_for(self, account_id: str) -> list[Project]:
        async with self.db.connection() as conn:
            cur = conn.cursor(row_factory=_PROJECT)
            await cur.execute(
                f"SELECT {_COLUMNS} FROM projects WHERE account_id = %s ORDER BY name",
                (account_id,),
            )
            return await cur.fetchall()

    async def update(
        self, conn: Conn, account_id: str, ref: str, changes: dict[str, object]
    ) -> Project:
        """Apply validated ``changes`` (keys in ``UPDATABLE``) in the
        caller's transaction. Raises ``NotFound``."""
        project = await self.get_in(conn, account_id, ref)
        if not changes:
            return project
        assignments = ", ".join(f"{name} = %s" for name in changes)
        cur = conn.cursor(row_factory=_PROJECT)
        await cur.execute(
            f"UPDATE projects SET {assignments}, updated_at = now() WHERE id = %s"
            f" RETURNING {_COLUMNS}",
            (*(_sql_value(v) for v in changes.values()), project.id),
        )
        updated = await cur.fetchone()
        assert updated is not None
        return updated

    async def purge_cache(self, conn: Conn, account_id: str, project_id: str) -> int:
        """Start a new cache generation for project ``project_id`` of
        ``account_id`` and return it; builds dispatched afterwards use it.
        Raises ``NotFound`` when the account holds no such project."""
        if not is_uuid(project_id):
            raise NotFound(f"project {project_id!r} not found")
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute(
            "UPDATE projects SET cache_generation = cache_generation + 1, updated_at = now()"
            " WHERE id = %s AND account_id = %s RETURNING cache_generation",
            (project_id, account_id),
        )
        generation = await cur.fetchone()
        if generation is None:
            raise NotFound(f"project {project_id!r} not found")
        return int(generation)

    async def connect_forge(self, conn: Conn, project_id: str, forge: str, repo: str) -> None:
        """Fill the project's empty forge and repository from a signed
        webhook (``forge`` is the endpoint it came to, ``repo`` the name its
        payload gives); settings a user chose are never overwritten, a
        project set to one forge is not moved to another, and the API base
        is never set here: a payload must not choose where the forge token
        goes."""
        await conn.execute(
            "UPDATE projects SET forge = %s,"
            " forge_repo = CASE WHEN forge_repo = '' THEN %s ELSE forge_repo END"
            " WHERE id = %s AND forge IN ('', %s) AND (forge = '' OR forge_repo = '')",
            (forge, repo, project_id, forge),
        )

    async def rotate_webhook_secret(self, conn: Conn, account_id: str, project_id: str) -> Project:
        """Give project ``project_id`` of ``account_id`` a new webhook
        secret (the old one stops verifying when the caller commits) and
        return the project with it. Raises ``NotFound``."""
        cur = conn.cursor(row_factory=_PROJECT)
        await cur.execute(
            f"UPDATE projects SET webhook_secret = %s, updated_at = now()"
            f" WHERE id = %s AND account_id = %s RETURNING {_COLUMNS}",
            (secrets.token_hex(24), project_id, account_id),
        )
        project = await cur.fetchone()
        if project is None:
            raise NotFound(f"project {project_id!r} not found")
        return project

    async def delete(self, conn: Conn, account_id: str, ref: str) -> Project:
        """Delete the project (its builds, variables and hooks go with it)
        in the caller's transaction and return it as it was. Raises
        ``NotFound``, or ``FailedPrecondition`` while a build of it runs."""
        project = await self.get_in(conn, account_id, ref)
        cur = conn.cursor(row_factory=scalar_row)
        await cur.execute(
            "SELECT count(*) FROM builds WHERE project_id = %s"
            " AND status IN ('initializing', 'running')",
            (project.id,),
        )
        running = await cur.fetchone()
        if running:
            raise FailedPrecondition(
                f"project {project.name!r} has {running} running build(s); cancel them first"
            )
        await conn.execute("DELETE FROM projects WHERE id = %s", (project.id,))
        return project
