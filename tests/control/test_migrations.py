"""The migration runner: ordered files, recorded, safe twice and in parallel."""

from __future__ import annotations

import asyncio

import psycopg

from control.storage.migrate import migrate, migration_files, pending


async def test_migrations_apply_in_order_once_and_are_recorded(database_url: str) -> None:
    files = migration_files()
    assert [v for v, _ in files] == sorted(v for v, _ in files)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        assert await pending(conn) == [v for v, _ in files]
        first = await migrate(conn)
        second = await migrate(conn)
        assert first == [v for v, _ in files]
        assert second == []
        assert await pending(conn) == []
        cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in await cur.fetchall()] == first
        cur = await conn.execute("SELECT to_regclass('builds') IS NOT NULL")
        row = await cur.fetchone()
        assert row is not None
        assert row[0]


async def test_concurrent_migrations_apply_each_file_once(database_url: str) -> None:
    async def one() -> list[str]:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            return await migrate(conn)

    results = await asyncio.gather(*(one() for _ in range(4)))
    applied = [v for r in results for v in r]
    assert sorted(applied) == [v for v, _ in migration_files()]
