"""Projects: every SQL statement about them."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import asdict

from control.domain.project import Project, ProjectSettings
from control.errors import FailedPrecondition, NotFound
from control.storage.db import Conn, Database, Row
from control.storage.ids import expand, is_prefix, is_uuid

_COLUMNS = (
    "id, account_id, name, repo_url, production_branch, build_command, deploy_command,"
    " preview_command, webhook_secret, run_timeout_seconds, cancel_in_progress,"
    " build_other_branches, root_directory, created_at, updated_at,"
    " branch_include, branch_exclude, watch_include, watch_exclude,"
    " forge, forge_api_url, forge_repo, network_isolated,"
    " cache_disabled, cache_lockfiles, cache_paths, cache_generation, fork_secrets"
)
UPDATABLE = frozenset(ProjectSettings.__dataclass_fields__)


def _project(row: Row) -> Project:
    return Project(
        id=str(row[0]),
        account_id=str(row[1]),
        name=row[2],
        repo_url=row[3],
        production_branch=row[4],
        build_command=row[5],
        deploy_command=row[6],
        preview_command=row[7],
        webhook_secret=row[8],
        run_timeout_seconds=row[9],
        cancel_in_progress=row[10],
        build_other_branches=row[11],
        root_directory=row[12],
        created_at=row[13],
        updated_at=row[14],
        branch_include=tuple(row[15]),
        branch_exclude=tuple(row[16]),
        watch_include=tuple(row[17]),
        watch_exclude=tuple(row[18]),
        forge=row[19],
        forge_api_url=row[20],
        forge_repo=row[21],
        network_isolated=row[22],
        cache_disabled=row[23],
        cache_lockfiles=tuple(row[24]),
        cache_paths=tuple(row[25]),
        cache_generation=row[26],
        fork_secrets=row[27],
    )


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
        cur = await conn.execute(
            f"INSERT INTO projects (id, account_id, webhook_secret, {', '.join(values)})"
            f" VALUES (%s, %s, %s, {', '.join(['%s'] * len(values))})"
            f" RETURNING {_COLUMNS}",
            (uuid.uuid4(), account_id, secrets.token_hex(24), *values.values()),
        )
        row = await cur.fetchone()
        assert row is not None
        return _project(row)

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
        row = await self._find(conn, account_id, ref)
        if row is None and account_id is not None and is_prefix(ref):
            full = await expand(
                conn, ref, table="projects", kind="project", field="project",
                scope="account_id = %s", params=(account_id,),
            )  # fmt: skip
            row = await self._find(conn, account_id, full)
        if row is None:
            raise NotFound(f"project {ref!r} not found")
        return _project(row)

    async def _find(self, conn: Conn, account_id: str | None, ref: str) -> Row | None:
        """The row of the project with id or name ``ref``, or None."""
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
        cur = await conn.execute(
            f"SELECT {_COLUMNS} FROM projects WHERE {' AND '.join(clauses)}", params
        )
        return await cur.fetchone()

    async def list_for(self, account_id: str) -> list[Project]:
        async with self.db.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM projects WHERE account_id = %s ORDER BY name",
                (account_id,),
            )
            return [_project(r) for r in await cur.fetchall()]

    async def update(
        self, conn: Conn, account_id: str, ref: str, changes: dict[str, object]
    ) -> Project:
        """Apply validated ``changes`` (keys in ``UPDATABLE``) in the
        caller's transaction. Raises ``NotFound``."""
        project = await self.get_in(conn, account_id, ref)
        if not changes:
            return project
        assignments = ", ".join(f"{name} = %s" for name in changes)
        cur = await conn.execute(
            f"UPDATE projects SET {assignments}, updated_at = now() WHERE id = %s"
            f" RETURNING {_COLUMNS}",
            (*(_sql_value(v) for v in changes.values()), project.id),
        )
        row = await cur.fetchone()
        assert row is not None
        return _project(row)

    async def purge_cache(self, conn: Conn, account_id: str, project_id: str) -> int:
        """Start a new cache generation for project ``project_id`` of
        ``account_id`` and return it; builds dispatched afterwards use it.
        Raises ``NotFound`` when the account holds no such project."""
        if not is_uuid(project_id):
            raise NotFound(f"project {project_id!r} not found")
        cur = await conn.execute(
            "UPDATE projects SET cache_generation = cache_generation + 1, updated_at = now()"
            " WHERE id = %s AND account_id = %s RETURNING cache_generation",
            (project_id, account_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"project {project_id!r} not found")
        return int(row[0])

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
        cur = await conn.execute(
            f"UPDATE projects SET webhook_secret = %s, updated_at = now()"
            f" WHERE id = %s AND account_id = %s RETURNING {_COLUMNS}",
            (secrets.token_hex(24), project_id, account_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"project {project_id!r} not found")
        return _project(row)

    async def delete(self, conn: Conn, account_id: str, ref: str) -> Project:
        """Delete the project (its builds, variables and hooks go with it)
        in the caller's transaction and return it as it was. Raises
        ``NotFound``, or ``FailedPrecondition`` while a build of it runs."""
        project = await self.get_in(conn, account_id, ref)
        cur = await conn.execute(
            "SELECT count(*) FROM builds WHERE project_id = %s"
            " AND status IN ('initializing', 'running')",
            (project.id,),
        )
        row = await cur.fetchone()
        if row and row[0]:
            raise FailedPrecondition(
                f"project {project.name!r} has {row[0]} running build(s); cancel them first"
            )
        await conn.execute("DELETE FROM projects WHERE id = %s", (project.id,))
        return project
