"""The embedded PostgreSQL on a full disk: once it dies (a WAL PANIC, or
kill -9 as here) it cannot start while the disk is full (its lock file
needs a page), and `conveyor up`'s supervisor keeps trying with backoff, so
it comes back by itself, with its data, soon after space returns.

The disk is a tmpfs the test mounts (root only) and unmounts."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from common.retry import RetryPolicy
from control.storage.embedded import EmbeddedPostgres
from conveyor_cli.supervisor import PostgresSupervisor, SupervisorMetrics
from tests.helpers import mounted_tmpfs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def small_disk() -> Iterator[Path]:
    with mounted_tmpfs("160m", "conveyor-pgdisk-") as path:
        yield path


def _fill(disk: Path) -> Path:
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    with ballast.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize)
    return ballast


async def _query(url: str, sql: str) -> object:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=2) as c:
        cur = await c.execute(sql)
        row = await cur.fetchone() if cur.description else None
        return row[0] if row else None


async def test_postgres_that_died_on_a_full_disk_comes_back_once_space_returns(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="conveyor_cli.supervisor")
    server = EmbeddedPostgres(small_disk / "data")
    metrics = SupervisorMetrics(CollectorRegistry())
    supervisor = PostgresSupervisor(
        server, metrics, policy=RetryPolicy(base=0.2, cap=1.0, jitter=(0.8, 1.2))
    )
    url = await supervisor.start()
    watch = asyncio.create_task(supervisor.watch())
    try:
        await _query(url, "CREATE TABLE kept AS SELECT generate_series(1, 1000) AS n")
        ballast = await asyncio.to_thread(_fill, small_disk)
        with pytest.raises(psycopg.errors.DiskFull):
            await _query(url, "INSERT INTO kept SELECT generate_series(1, 1000000)")

        # The postmaster dies (kill -9 stands in for a PANIC's crash).
        psutil.Process(server.postmaster_pid()).kill()
        deadline = time.monotonic() + 30
        while "did not start (attempt 3)" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.1)
        with pytest.raises(psycopg.OperationalError):
            await _query(url, "SELECT 1")

        ballast.unlink()
        freed = time.monotonic()
        while True:
            try:
                assert await _query(url, "SELECT count(*) FROM kept") == 1000
                break
            except psycopg.OperationalError:
                assert time.monotonic() - freed < 15, "PostgreSQL did not come back"
                await asyncio.sleep(0.1)
        back_after = time.monotonic() - freed
        # Retries are at most max_delay (1 s, +20 % jitter) apart here; `up`
        # uses 30 s, the documented bound.
        assert back_after < 5, back_after
        assert metrics.restarts.labels(child="postgres")._value.get() == 1
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await supervisor.stop()
