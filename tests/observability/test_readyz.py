"""/healthz says the process is alive; /readyz says it can serve: the
database answers and has every migration this code knows."""

from __future__ import annotations

import asyncio
import time

import psycopg

from control.http import DB_PROBE_SECONDS
from control.storage.migrate import migration_files
from tests.helpers import ControlHandle
from tests.observability.scrape import get_json, scrape


async def wait_ready(url: str, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await get_json(url + "/readyz")
        if code == 200:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz still {code} {body} after {timeout} s")
        await asyncio.sleep(0.1)


async def test_readyz_is_503_while_a_migration_is_pending(
    control: ControlHandle, database_url: str
) -> None:
    url = control.http_url
    assert await get_json(url + "/readyz") == (200, {"status": "ready"})
    assert await get_json(url + "/healthz") == (200, {"status": "ok"})

    latest = migration_files()[-1][0]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("DELETE FROM schema_migrations WHERE version = %s", (latest,))
        try:
            code, body = await get_json(url + "/readyz")
            assert (code, body) == (503, {"status": "migrating", "pending": [latest]})
            assert await get_json(url + "/healthz") == (200, {"status": "ok"})
        finally:
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (latest,))
    assert await get_json(url + "/readyz") == (200, {"status": "ready"})


async def test_readyz_is_503_while_the_database_is_unreachable_and_recovers(
    control: ControlHandle, database_url: str, pg_server: str
) -> None:
    url = control.http_url
    name = database_url.rpartition("/")[2]
    async with await psycopg.AsyncConnection.connect(pg_server, autocommit=True) as admin:
        # Refuse new sessions and end the existing ones: to the control
        # plane this is a database that went away.
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            began = time.monotonic()
            (code, body), alive, metrics = await asyncio.gather(
                get_json(url + "/readyz"), get_json(url + "/healthz"), scrape(url + "/metrics")
            )
            assert code == 503, body
            assert body["status"] == "unavailable"
            assert time.monotonic() - began < DB_PROBE_SECONDS + 3
            # Alive all the same: an orchestrator must not restart it for this.
            assert alive == (200, {"status": "ok"})
            # /metrics still answers; the database-read gauges go absent
            # rather than stale, the process's own metrics stay.
            assert not metrics.has("conveyor_active_builds")
            assert "conveyor_active_builds" in metrics.families
            assert metrics.has("conveyor_db_pool_connections")
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert await wait_ready(url) == {"status": "ready"}
    metrics = await scrape(url + "/metrics")
    assert metrics.value("conveyor_active_builds") == 0
