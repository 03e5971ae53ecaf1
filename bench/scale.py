"""Part 6: many builds active at once.

`conveyor control serve` against its own database, with simulated runners
(bench.runner_sim, the real runner protocol) that take each build, report
initializing and running, heartbeat at the interval the control plane asks
for, and then hold the build: a fleet of long `sleep` builds as the control
plane sees them. The builds are queued with SQL (bench.seed) in an account
whose concurrency limit is raised to fit them all.

Readings of the control-plane process (and, separately, of PostgreSQL):
resident memory and CPU over a quiet window with the runners connected but
no builds (baseline), then over the same window with every build active.
The difference, divided by the number of builds, is the cost of one active
build; the whole CPU reading with every build active is the idle overhead
of heartbeats, alarm passes and dispatch re-checks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from bench import seed
from bench.client import db_commits
from bench.context import Context
from bench.figures import Figure, PartResult, at_most
from bench.processes import BenchError, ControlServe, Postgres, UsageMeter, poll
from bench.runner_sim import Fleet

PART = "6 scale"


async def run(
    ctx: Context, builds: int = 1000, runners: int = 50, window: float = 30.0
) -> PartResult:
    """Raises ``BenchError`` when the builds do not all become active."""
    work = ctx.part_dir("scale")
    database_url = await ctx.postgres.new_database("scale")
    capacity = -(-builds // runners)
    async with ControlServe(work, database_url, ctx.profile("scale")) as control:
        await control.start()
        fleet = await Fleet(
            control.grpc_address, control.runner_token, runners, capacity, "hold"
        ).start()
        conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        try:
            (account,) = await seed.accounts(conn, ["scale"], builds)
            await asyncio.sleep(5)  # let the start-up settle before the baseline
            base = await _window(control, ctx.postgres, conn, fleet, window)
            ids, _ = await seed.queue(conn, [(account, builds)])
            if not await poll(lambda: _all_running(conn, len(ids)), 300, every=0.5):
                raise BenchError(f"not all {builds} builds became active within 300 s")
            await asyncio.sleep(5)
            busy = await _window(control, ctx.postgres, conn, fleet, window)
        finally:
            await conn.close()
            await fleet.close()
    if fleet.errors:
        raise BenchError(f"simulated runners got errors, first: {fleet.errors[0]}")
    per_build_kb = (busy["rss_mb"] - base["rss_mb"]) * 1024 / builds
    per_build_cpu = (busy["cpu_percent"] - base["cpu_percent"]) / builds
    raw = {"builds": builds, "runners": runners, "window_s": window, "baseline": base,
           "active": busy}  # fmt: skip
    note = f"{runners} runners x {capacity} slots; idle window {window:.0f} s"
    figures = [
        Figure(PART, f"control-plane RSS, {builds:,} active builds", busy["rss_mb"], "MB",
               at_most(300), note=f"no builds: {base['rss_mb']:.0f} MB"),
        Figure(PART, "RSS per active build", per_build_kb, "KB"),
        Figure(PART, f"control-plane idle CPU, {builds:,} active builds", busy["cpu_percent"],
               "% of a core", at_most(5), note=note),
        Figure(PART, "idle CPU per active build", per_build_cpu * 1000, "‰ of a core",
               note=f"no builds: {base['cpu_percent']:.2f} %"),
        Figure(PART, f"PostgreSQL CPU, {builds:,} active builds", busy["postgres_cpu"],
               "% of a core", note=f"no builds: {base['postgres_cpu']:.2f} %"),
        Figure(PART, "database transactions/s while idle", busy["xact_per_s"], "tx/s",
               note=f"heartbeats {busy['heartbeats_per_s']:.1f}/s;"
                    f" no builds: {base['xact_per_s']:.0f} tx/s"),
    ]  # fmt: skip
    return PartResult("scale", figures, raw)


async def _all_running(conn: psycopg.AsyncConnection[Any], count: int) -> bool:
    cur = await conn.execute("SELECT count(*) FROM builds WHERE status = 'running'")
    row = await cur.fetchone()
    return bool(row and row[0] >= count)


async def _window(
    control: ControlServe,
    postgres: Postgres,
    conn: psycopg.AsyncConnection[Any],
    fleet: Fleet,
    seconds: float,
) -> dict[str, float]:
    """CPU and memory of the control plane and PostgreSQL over ``seconds``
    of quiet, and the database's commit rate in it."""
    control_meter = UsageMeter([control.pid])
    pg_meter = UsageMeter(postgres.backend_pids())
    beats0 = fleet.count("heartbeats")
    commits0 = await db_commits(conn)
    control_meter.start()
    pg_meter.start()
    await asyncio.sleep(seconds)
    control_usage = control_meter.stop()
    pg_usage = pg_meter.stop()
    done = await db_commits(conn) - commits0
    return {
        "cpu_percent": control_usage.cpu_percent,
        "rss_mb": control_usage.rss_mb,
        "postgres_cpu": pg_usage.cpu_percent,
        "xact_per_s": done / control_usage.seconds,
        "heartbeats_per_s": (fleet.count("heartbeats") - beats0) / control_usage.seconds,
    }
