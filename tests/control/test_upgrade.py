"""A database written by the previous release migrates to this one with
nothing lost: apply the migrations of an older schema, fill every table
with rows as that release wrote them, migrate to the newest schema, and
every row is still there with every value it had (new columns may be added
around it); this release's API then reads the old builds and their logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from control.storage.migrate import migrate, migration_files
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle

# The last migration of the previous release. Move it forward when a release
# is cut (and give rows to the tables it added in fixtures/previous_release.sql).
PREVIOUS_RELEASE = "0007_fork_builds"

DONE = "00000000-0000-4000-8000-000000000004"
# Rows as the previous release wrote them, in blocks by table.
FIXTURE = Path(__file__).parent / "fixtures" / "previous_release.sql"


def fixture_rows() -> list[tuple[str, str]]:
    """(table, INSERT statement) of every block of ``FIXTURE``."""
    rows = []
    for block in FIXTURE.read_text().split("-- table: ")[1:]:
        table, _, insert = block.partition("\n")
        rows.append((table.strip(), insert))
    return rows


async def _tables(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    cur = await conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        " AND table_type = 'BASE TABLE' AND table_name <> 'schema_migrations' ORDER BY 1"
    )
    return [str(r[0]) for r in await cur.fetchall()]


async def _snapshot(
    conn: psycopg.AsyncConnection[Any], tables: list[str]
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for table in tables:
        # The table names come from the catalog.
        cur = await conn.execute(f"SELECT to_jsonb(t) FROM {table} t")  # noqa: S608
        out[table] = [r[0] for r in await cur.fetchall()]
    return out


def _canonical(rows: list[dict[str, Any]], columns: set[str]) -> list[str]:
    return sorted(
        json.dumps({k: v for k, v in r.items() if k in columns}, sort_keys=True) for r in rows
    )


@pytest.mark.parametrize("newest_missing", [None, 1], ids=["previous-release", "all-but-newest"])
async def test_a_database_of_the_previous_release_migrates_with_nothing_lost(
    database_url: str, newest_missing: int | None
) -> None:
    files = migration_files()
    versions = [v for v, _ in files]
    assert PREVIOUS_RELEASE in versions
    if newest_missing is None:
        old = versions[: versions.index(PREVIOUS_RELEASE) + 1]
    else:
        old = versions[:-newest_missing]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # The older schema, as the previous release's migrate() left it.
        await conn.execute(
            "CREATE TABLE schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in files[: len(old)]:
            await conn.execute(sql.encode())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        tables = await _tables(conn)
        for table, insert in fixture_rows():
            if table in tables:
                await conn.execute(insert.encode())
        before = await _snapshot(conn, tables)
        empty = [t for t in tables if not before[t]]
        assert empty == [], f"give the fixture rows for {empty}"

        applied = await migrate(conn)
        assert applied == versions[len(old) :]
        after = await _snapshot(conn, await _tables(conn))
    for table in tables:
        assert table in after, f"{table} was dropped"
        columns = set(before[table][0])
        assert _canonical(after[table], columns) == _canonical(before[table], columns), table

    # This release reads what the previous one wrote.
    control = ControlHandle(database_url)
    await control.start()
    api = Api(control.plane.grpc_address, control.admin_token)
    try:
        done = await api.get(DONE)
        assert done.status == pb.BUILD_STATUS_FAILED
        assert done.status_reason == "exit_code=2 in step build"
        assert list(done.warnings) == ["cache not saved"]
        lines = await api.logs(DONE)
        assert [(ln.number, ln.text) for ln in lines] == [
            (1, "compiling"),
            (2, "warning: x"),
            (3, "[conveyor] step build failed"),
        ]
        assert lines[1].stream == pb.LOG_STREAM_STDERR
    finally:
        await api.close()
        await control.stop()
