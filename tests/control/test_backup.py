"""`conveyor backup` and `conveyor restore`: a filled database survives a
round trip into a fresh one, rows and secrets alike, for an external
database URL and for the embedded PostgreSQL of a `conveyor up` data
directory."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from control.secrets import SecretBox
from control.storage.db import Database
from control.storage.env import EnvStore
from control.storage.migrate import migration_files, pending
from conveyor.v1 import config_service_pb2 as cs
from tests.helpers import Api, ControlHandle

# What must come back, row for row.
TABLES = (
    "accounts", "api_tokens", "projects", "project_env", "builds", "build_steps",
    "log_chunks", "audit_log", "schema_migrations",
)  # fmt: skip


@pytest.fixture
def fresh_database_url(pg_server: str) -> Iterator[str]:
    """A second empty database on the test server, dropped afterwards."""
    name = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = pg_server.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def conveyor(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the real `conveyor` command; return its exit code and output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor_cli.main", *args, env={**clean, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def table_rows(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the tables in TABLES, sorted, for comparison."""
    out = {}
    with psycopg.connect(url) as conn:
        for table in TABLES:
            cur = conn.execute(f"SELECT * FROM {table}")  # noqa: S608  # names from this file
            out[table] = sorted(cur.fetchall(), key=repr)
    return out


async def secret_of(url: str, key: bytes, project_id: str) -> dict[str, str]:
    db = Database(url, min_size=1, max_size=2)
    await db.open()
    try:
        async with db.connection() as conn:
            env = await EnvStore(db, SecretBox((key,))).for_build(conn, project_id)
    finally:
        await db.close()
    return {v.name: v.value for v in env}


async def test_backup_restores_rows_and_secrets_into_a_fresh_database(
    control: ControlHandle, api: Api, repo: Path, fresh_database_url: str, tmp_path: Path
) -> None:
    project = await api.create_project("site", repo)
    await api.config.SetEnvVar(
        cs.SetEnvVarRequest(project="site", name="DEPLOY_KEY", value="s3cr3t-value", secret=True),
        metadata=api.metadata,
    )
    await api.config.SetEnvVar(
        cs.SetEnvVarRequest(project="site", name="REGION", value="eu", secret=False),
        metadata=api.metadata,
    )
    build = await api.trigger("site")
    await api.cancel(build.id)
    await control.plane.logs.append_packed(build.id, 1, "1\to\tcompiling\n2\te\twarning: x", 2)
    source = control.settings.database_url
    before = table_rows(source)
    assert before["log_chunks"]
    assert before["project_env"]
    assert before["audit_log"]

    archive = tmp_path / "conveyor.dump"
    code, out, err = await conveyor("backup", str(archive), env={"CONVEYOR_DATABASE_URL": source})
    assert code == 0, err
    assert "secret key is not in the archive" in out
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert not archive.with_name("conveyor.dump.partial").exists()

    target = {"CONVEYOR_DATABASE_URL": fresh_database_url}
    code, out, err = await conveyor("restore", str(archive), env=target)
    assert code == 0, err
    assert "1 projects, 1 builds, 1 log_chunks, 2 project_env" in out
    assert table_rows(fresh_database_url) == before
    assert await secret_of(fresh_database_url, control.secret_key, project.id) == {
        "DEPLOY_KEY": "s3cr3t-value",
        "REGION": "eu",
    }
    async with await psycopg.AsyncConnection.connect(fresh_database_url, autocommit=True) as conn:
        assert await pending(conn) == []

    # A database that holds anything is refused unless --replace.
    code, _, err = await conveyor("restore", str(archive), env=target)
    assert code == 1
    assert "not empty" in err
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM project_env")
    code, _, err = await conveyor("restore", str(archive), "--replace", env=target)
    assert code == 0, err
    assert table_rows(fresh_database_url) == before

    # A damaged archive fails and leaves the database as it was.
    bad = tmp_path / "bad.dump"
    bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    code, _, err = await conveyor("restore", str(bad), "--replace", env=target)
    assert code == 1
    assert "pg_restore failed" in err
    assert table_rows(fresh_database_url) == before
    with psycopg.connect(fresh_database_url) as conn:
        schemas = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'conveyor%'")
        assert schemas.fetchall() == []


async def test_nothing_to_back_up_is_an_error(tmp_path: Path) -> None:
    code, _, err = await conveyor("backup", str(tmp_path / "x.dump"), env={})
    assert code == 2
    assert "CONVEYOR_DATABASE_URL" in err


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_embedded_database_of_a_data_directory_round_trips(tmp_path: Path) -> None:
    from control.storage.embedded import EmbeddedPostgres
    from control.storage.migrate import migrate

    source_dir, target_dir = tmp_path / "up", tmp_path / "restored"
    server = EmbeddedPostgres(source_dir / "postgres")
    url = await asyncio.to_thread(server.start)
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await migrate(conn)
            await conn.execute(
                "INSERT INTO accounts (id, name) VALUES (%s, 'acme')", (str(uuid.uuid4()),)
            )
        # Running (as under `conveyor up`): backed up and left running.
        archive = tmp_path / "up.dump"
        code, _, err = await conveyor("--data-dir", str(source_dir), "backup", str(archive), env={})
        assert code == 0, err
        assert server.postmaster_pid()
    finally:
        await asyncio.to_thread(server.stop)

    # Not running: the command starts the server, restores, stops it.
    code, _, err = await conveyor("restore", str(archive), "--data-dir", str(target_dir), env={})
    assert code == 0, err
    restored = EmbeddedPostgres(target_dir / "postgres")
    assert not restored.postmaster_pid()
    url = await asyncio.to_thread(restored.start)
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT name FROM accounts").fetchall()
            versions = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert row == [("acme",)]
        assert versions == (len(migration_files()),)
    finally:
        await asyncio.to_thread(restored.stop)
