"""Retention: which old rows go and which stay, one replica at a time, the
loop inside the control plane, and collection of a million log lines while
a live build's ingest keeps its latency."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from control.config import RetentionSettings, Settings
from control.main import ControlPlane
from control.metrics import ControlMetrics
from control.retention import Retention
from control.storage import retention as sql
from control.storage.db import Conn, Database
from control.storage.logs import LogStore
from control.storage.migrate import migrate


@dataclass
class World:
    url: str
    conn: Conn
    account: str
    project: str

    async def build(
        self,
        branch: str = "main",
        days_ago: float = 200,
        status: str = "succeeded",
        retry_of: str | None = None,
    ) -> str:
        """A build created (and, when final, ended) ``days_ago`` days ago,
        with a step and a two-line log."""
        build_id = str(uuid.uuid4())
        await self.conn.execute(
            "INSERT INTO builds (id, project_id, account_id, branch, commit_sha, status, trigger,"
            " production, retry_of, created_at, finished_at, log_lines)"
            " VALUES (%s, %s, %s, %s, 'abc', %s, 'push', false, %s,"
            " clock_timestamp() - %s * interval '1 day',"
            " CASE WHEN %s THEN clock_timestamp() - %s * interval '1 day' END, 2)",
            (
                build_id, self.project, self.account, branch, status, retry_of, days_ago,
                status not in ("queued", "initializing", "running"), days_ago,
            ),
        )  # fmt: skip
        await self.conn.execute(
            "INSERT INTO build_steps (build_id, idx, name) VALUES (%s, 0, 'build')", (build_id,)
        )
        await self.conn.execute(
            "INSERT INTO log_chunks (build_id, first_line, line_count, seq, data)"
            " VALUES (%s, 1, 2, 1, %s)",
            (build_id, "1\to\tone\n2\to\ttwo"),
        )
        return build_id

    async def ids(self, table: str, column: str = "id") -> set[str]:
        cur = await self.conn.execute(f"SELECT DISTINCT {column}::text FROM {table}")  # noqa: S608  # names from this file
        return {str(r[0]) for r in await cur.fetchall()}

    async def count(self, query: str, *args: object) -> int:
        cur = await self.conn.execute(query, args)
        row = await cur.fetchone()
        assert row is not None
        return int(str(row[0]))


@pytest_asyncio.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    conn: Conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await migrate(conn)
    account, project = str(uuid.uuid4()), str(uuid.uuid4())
    await conn.execute("INSERT INTO accounts (id, name) VALUES (%s, 'acme')", (account,))
    await conn.execute(
        "INSERT INTO projects (id, account_id, name, repo_url, production_branch,"
        " webhook_secret, run_timeout_seconds) VALUES (%s, %s, 'site', 'r', 'main', 's', 60)",
        (project, account),
    )
    try:
        yield World(database_url, conn, account, project)
    finally:
        await conn.close()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_old_builds_go_except_the_newest_of_each_branch_unfinished_and_retried(
    world: World,
) -> None:
    w = world
    # main, oldest first: four old builds, then two recent ones.
    old_main = [await w.build(days_ago=300 - i) for i in range(4)]
    retried = await w.build(days_ago=250, status="failed")
    await w.build(days_ago=1, retry_of=retried, status="queued")  # a live retry keeps it
    finished_retry_of = await w.build(days_ago=240, status="failed")
    await w.build(days_ago=2, retry_of=finished_retry_of, status="failed")
    recent = await w.build(days_ago=1)
    stuck = await w.build(days_ago=200, status="running")  # never final: kept
    lone = await w.build(branch="old-feature", days_ago=400)  # newest of its branch
    trio = [await w.build(branch="topic", days_ago=d) for d in (500, 499, 498)]
    young = await w.build(branch="young", days_ago=10)
    await w.build(branch="young", days_ago=5)
    await w.build(branch="young", days_ago=4)

    for days, provider in ((20, "old"), (1, "new")):
        await w.conn.execute(
            "INSERT INTO webhook_deliveries (provider, delivery_id, project_id, received_at)"
            " VALUES (%s, 'd', %s, now() - make_interval(days => %s))",
            (provider, w.project, days),
        )
    for days in (500, 10):
        await w.conn.execute(
            "INSERT INTO audit_log (account_id, at, actor, action, target)"
            " VALUES (%s, now() - make_interval(days => %s), 'a', 'x', %s)",
            (w.account, days, f"{days}d"),
        )
        await w.conn.execute(
            "INSERT INTO skipped_pushes (id, project_id, account_id, provider, event, reason,"
            " received_at) VALUES (%s, %s, %s, 'github', 'push', %s,"
            " now() - make_interval(days => %s))",
            (str(uuid.uuid4()), w.project, w.account, f"{days}d", days),
        )

    registry = CollectorRegistry()
    metrics = ControlMetrics(registry)
    settings = RetentionSettings(keep_per_branch=2, builds_per_batch=3, rows_per_batch=1)
    retention = Retention(w.url, settings, metrics.retention)
    deleted = await retention.run_pass()

    # main's newest two are `recent` and the live retry; the finished retry
    # of `finished_retry_of` does not protect it.
    gone = {*old_main, finished_retry_of, trio[0]}
    assert deleted is not None
    assert deleted["builds"].rows == len(gone)
    assert deleted["log_chunks"].rows == len(gone)
    remaining = await w.ids("builds")
    assert not gone & remaining
    assert {retried, recent, stuck, lone, *trio[1:], young} <= remaining
    assert not gone & await w.ids("log_chunks", "build_id")
    assert not gone & await w.ids("build_steps", "build_id")
    # The finished retry stays, its retry_of cleared.
    assert await w.count(
        "SELECT count(*) FROM builds WHERE retry_of IS NULL AND status = 'failed'"
        " AND created_at > now() - interval '3 days'"
    ) == 1  # fmt: skip
    assert await w.ids("webhook_deliveries", "provider") == {"new"}
    assert await w.ids("audit_log", "target") == {"10d"}
    assert await w.ids("skipped_pushes", "reason") == {"10d"}

    assert sample(registry, "conveyor_retention_rows_deleted_total", table="builds") == len(gone)
    assert sample(registry, "conveyor_retention_rows_deleted_total", table="audit_log") == 1
    assert sample(registry, "conveyor_retention_bytes_deleted_total", table="log_chunks") > 0
    assert sample(registry, "conveyor_table_bytes", table="log_chunks") > 0
    assert sample(registry, "conveyor_retention_passes_total", result="ok") == 1
    assert sample(registry, "conveyor_retention_last_success_timestamp_seconds") > 0

    assert await retention.run_pass() == {}

    # 0 days keeps forever.
    keep_all = RetentionSettings(build_days=0, delivery_days=0, audit_days=0, keep_per_branch=0)
    assert await Retention(w.url, keep_all, metrics.retention).run_pass() == {}
    assert lone in await w.ids("builds")


async def test_one_replica_collects_at_a_time(world: World) -> None:
    old = await world.build(branch="a", days_ago=300)
    await world.build(branch="a", days_ago=1)
    registry = CollectorRegistry()
    metrics = ControlMetrics(registry)
    retention = Retention(world.url, RetentionSettings(keep_per_branch=1), metrics.retention)
    async with await psycopg.AsyncConnection.connect(world.url, autocommit=True) as other:
        await other.execute("SELECT pg_advisory_lock(%s)", (sql.LOCK_KEY,))
        assert await retention.run_pass() is None
        assert old in await world.ids("builds")
        assert sample(registry, "conveyor_retention_passes_total", result="skipped") == 1
    # The other session ended, and with it its lock.
    deleted = await retention.run_pass()
    assert deleted is not None
    assert (deleted["builds"].rows, deleted["log_chunks"].rows) == (1, 1)
    assert old not in await world.ids("builds")


async def test_the_control_plane_runs_retention_and_stops_it(world: World) -> None:
    old = await world.build(branch="b", days_ago=100)
    await world.build(branch="b", days_ago=0)
    settings = Settings(
        database_url=world.url,
        grpc_addr="127.0.0.1:0",
        http_addr="127.0.0.1:0",
        retention=RetentionSettings(keep_per_branch=1, interval=0.2),
    )
    plane = ControlPlane(settings)
    await plane.start()
    try:
        deadline = time.monotonic() + 20
        while old in await world.ids("builds"):
            assert time.monotonic() < deadline, "the retention loop did not delete the old build"
            await asyncio.sleep(0.1)
        ok = re.compile(r'^conveyor_retention_passes_total\{result="ok"\} [1-9]', re.MULTILINE)
        while not ok.search(body := await asyncio.to_thread(_metrics_text, plane.http_url)):
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)
    finally:
        await plane.stop()
    assert plane.retention._task is None


def _metrics_text(http_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as reply:  # noqa: S310  # our own test server
        return str(reply.read().decode())


OLD_BUILDS = 50
LINES_PER_BUILD = 20_000
LINES_PER_CHUNK = 20


@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.timeout(180)
async def test_collecting_a_million_old_lines_leaves_live_ingest_latency_alone(
    world: World,
) -> None:
    w = world
    old = [await w.build(days_ago=300 + i) for i in range(OLD_BUILDS)]
    await w.conn.execute("DELETE FROM log_chunks")
    began = time.monotonic()
    await w.conn.execute(
        "INSERT INTO log_chunks (build_id, first_line, line_count, seq, data)"
        " SELECT b, (g - 1) * %(n)s + 1, %(n)s, g, ("
        "   SELECT string_agg('1700000000000' || E'\\to\\t' || 'compiling module '"
        "     || ((g - 1) * %(n)s + l) || ' ' || md5(b::text || g || '.' || l), E'\\n')"
        "   FROM generate_series(1, %(n)s) l)"
        " FROM unnest(%(ids)s::uuid[]) b, generate_series(1, %(chunks)s) g",
        {"n": LINES_PER_CHUNK, "ids": old, "chunks": LINES_PER_BUILD // LINES_PER_CHUNK},
    )
    await w.conn.execute("VACUUM ANALYZE log_chunks")
    fill_seconds = time.monotonic() - began
    lines = await w.count("SELECT sum(line_count) FROM log_chunks")
    assert lines == OLD_BUILDS * LINES_PER_BUILD == 1_000_000
    size_before = await w.count("SELECT pg_total_relation_size('log_chunks')")

    live = await w.build(days_ago=0, status="running")
    await w.conn.execute("DELETE FROM log_chunks WHERE build_id = %s", (live,))
    await w.conn.execute("UPDATE builds SET log_lines = 0 WHERE id = %s", (live,))
    db = Database(w.url, min_size=2, max_size=4)
    await db.open()
    store = LogStore(db)
    seq = 0

    async def ingest_one() -> float:
        """One real ingest batch of 50 lines; its latency in seconds."""
        nonlocal seq
        seq += 1
        packed = "\n".join(
            f"{int(time.time() * 1000)}\to\tlive line {seq}.{i}: compiling" for i in range(50)
        )
        t0 = time.perf_counter()
        await store.append_packed(live, seq, packed, 50)
        return time.perf_counter() - t0

    registry = CollectorRegistry()
    metrics = ControlMetrics(registry)
    retention = Retention(w.url, RetentionSettings(keep_per_branch=1), metrics.retention)
    try:
        for _ in range(20):  # warm the pool and the caches
            await ingest_one()
        before = [await ingest_one() for _ in range(400)]
        collect_began = time.monotonic()
        collecting = asyncio.create_task(retention.run_pass())
        during = []
        while not collecting.done():
            during.append(await ingest_one())
        deleted = await collecting
        collect_seconds = time.monotonic() - collect_began
    finally:
        await db.close()

    def p99(values: list[float]) -> float:
        return statistics.quantiles(values, n=100)[98]

    report = (
        f"fill {fill_seconds:.1f} s ({size_before / 2**20:.0f} MiB); collected"
        f" {deleted and deleted['log_chunks'].rows} chunks in {collect_seconds:.1f} s;"
        f" ingest p50/p99 before {statistics.median(before) * 1000:.1f}/{p99(before) * 1000:.1f}"
        f" ms, during {statistics.median(during) * 1000:.1f}/{p99(during) * 1000:.1f} ms"
        f" ({len(during)} batches)"
    )
    print(report)
    assert deleted is not None
    assert deleted["builds"].rows == OLD_BUILDS
    assert await w.count("SELECT count(*) FROM log_chunks WHERE build_id <> %s", live) == 0
    assert await w.count("SELECT sum(line_count) FROM log_chunks") == seq * 50
    assert len(during) >= 30, report
    # Bound: the issue asks that ingest latency "does not move"; on a shared
    # 2-core machine p99 noise alone reaches a few ms, hence 3x + 20 ms.
    assert p99(during) <= 3 * p99(before) + 0.020, report
