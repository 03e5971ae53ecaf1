"""Part 4: the scheduler under a deep queue across many accounts.

`conveyor control serve` against its own database; simulated runners
(bench.runner_sim, the real runner protocol) accept every assignment at
once and finish it at once, so the control plane's scheduling path is the
bottleneck: scheduler pass → StartBuild → dispatch on the runner stream →
the runner's reports freeing the slot. 10,000 builds are queued (SQL, see
bench.seed) across 100 accounts, each limited to 6 concurrent builds, in one
transaction with the NOTIFY a webhook would send.

Decisions per second: builds handed to a runner (assigned_at) over the time
from the queueing commit to the last one. Quiet account: while the others'
backlog drains, one build at a time is queued for an account with nothing
else queued; its wait is queued → assigned (the scheduler's decision) and
queued → initializing (the runner's report).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from bench import seed
from bench.client import db_commits, scrape
from bench.context import Context
from bench.figures import Figure, PartResult, at_least, at_most, summary
from bench.processes import BenchError, ControlServe, UsageMeter, poll
from bench.runner_sim import Fleet

PART = "4 scheduler"
TICK = 1.0  # the control plane's default scheduler tick (Settings.scheduler_tick)


async def run(
    ctx: Context,
    builds: int = 10_000,
    accounts: int = 100,
    limit: int = 6,
    runners: int = 10,
    capacity: int = 100,
) -> PartResult:
    """Raises ``BenchError`` when the queue does not drain within 15 minutes
    or a simulated runner gets an error."""
    work = ctx.part_dir("scheduler")
    database_url = await ctx.postgres.new_database("sched")
    async with ControlServe(work, database_url, ctx.profile("scheduler")) as control:
        await control.start()
        fleet = await Fleet(
            control.grpc_address, control.runner_token, runners, capacity, "finish"
        ).start()
        conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        try:
            made = await seed.accounts(conn, [f"acct-{i}" for i in range(accounts + 1)], limit)
            busy, quiet = made[:accounts], made[accounts]
            per = [(a, builds // accounts + (1 if i < builds % accounts else 0))
                   for i, a in enumerate(busy)]  # fmt: skip
            meter = UsageMeter([control.pid])
            before = await scrape(control.http_url)
            commits0 = await db_commits(conn)
            meter.start()
            ids, t0 = await seed.queue(conn, per)
            probes = await _drain(conn, quiet, ids, 900)
            usage = meter.stop()
            after = await scrape(control.http_url)
            commits = await db_commits(conn) - commits0
            assigned = await _assigned_times(conn, ids)
        finally:
            await conn.close()
            await fleet.close()
    if fleet.errors:
        raise BenchError(f"simulated runners got errors, first: {fleet.errors[0]}")
    span = max(assigned) - t0
    rate = len(assigned) / span
    passes = _delta(before, after, "conveyor_scheduler_tick_seconds_count")
    pass_time = _delta(before, after, "conveyor_scheduler_tick_seconds_sum")
    started_n = _delta(before, after, 'conveyor_scheduler_decisions_total{decision="started"}')
    decision = summary([p["decision"] for p in probes])
    started = summary([p["initializing"] for p in probes])
    raw = {
        "builds": builds,
        "accounts": accounts,
        "limit": limit,
        "runner_slots": runners * capacity,
        "drain_s": span,
        "decisions_per_s": rate,
        "control_cpu_percent": usage.cpu_percent,
        "db_transactions": commits,
        "db_transactions_per_build": commits / max(len(ids), 1),
        "passes": passes,
        "pass_seconds": pass_time,
        "started_by_passes": started_n,
        "probes": probes,
        "quiet_decision_s": decision,
        "quiet_initializing_s": started,
    }
    note = f"{len(probes)} probes, backlog {min(p['backlog'] for p in probes):.0f}+ builds"
    figures = [
        Figure(
            PART,
            f"decisions/s, {builds:,} builds in {accounts} accounts",
            rate,
            "builds/s",
            at_least(2000),
            lower_is_better=False,
            note=f"drained in {span:.1f} s; control-plane CPU {usage.cpu_percent:.0f} %;"
            f" {commits / max(len(ids), 1):.0f} database transactions per build",
        ),
        Figure(
            PART,
            "decisions per second of scheduler-pass time",
            started_n / pass_time if pass_time else None,
            "builds/s",
            lower_is_better=False,
            note=f"{passes:.0f} passes, {1000 * pass_time / max(passes, 1):.0f} ms each",
        ),
        Figure(
            PART,
            "quiet account: queued → assigned, max",
            decision["max"],
            "s",
            at_most(TICK),
            note=note,
        ),
        Figure(PART, "quiet account: queued → assigned, p50", decision["p50"], "s"),
        Figure(PART, "quiet account: queued → initializing, max", started["max"], "s"),
    ]  # fmt: skip
    return PartResult("scheduler", figures, raw)


async def _drain(
    conn: psycopg.AsyncConnection[Any], quiet: seed.Account, ids: list[str], within: float
) -> list[dict[str, float]]:
    """Probe the quiet account until the backlog is down to a tenth, then
    wait for the rest to finish; return the probes."""
    deadline = time.monotonic() + within
    probes: list[dict[str, float]] = []
    while time.monotonic() < deadline:
        backlog = await _waiting(conn)
        if backlog < len(ids) // 10:
            break
        probes.append({"backlog": float(backlog), **await _probe(conn, quiet, 60)})
        await asyncio.sleep(0.5)

    async def drained() -> bool:
        cur = await conn.execute(
            "SELECT count(*) FROM builds WHERE status <> 'succeeded' AND id = ANY(%s::uuid[])",
            (ids,),
        )
        row = await cur.fetchone()
        return bool(row and row[0] == 0)

    if not await poll(drained, max(deadline - time.monotonic(), 0), every=0.2):
        raise BenchError(f"the queue of {len(ids)} builds did not drain within {within:.0f} s")
    return probes


async def _probe(
    conn: psycopg.AsyncConnection[Any], quiet: seed.Account, within: float
) -> dict[str, float]:
    """Queue one build of the quiet account; return its waits (s)."""
    (build_id,), _ = await seed.queue(conn, [(quiet, 1)])
    rows: list[tuple[Any, ...]] = []

    async def initializing() -> bool:
        cur = await conn.execute(
            "SELECT created_at, assigned_at, started_at FROM builds WHERE id = %s", (build_id,)
        )
        rows[:] = [tuple(r) for r in await cur.fetchall()]
        return bool(rows and rows[0][2] is not None)

    if not await poll(initializing, within, every=0.01):
        raise BenchError(f"the quiet account's build {build_id} did not start in {within} s")
    created, assigned, started = rows[0]
    return {
        "decision": (assigned - created).total_seconds(),
        "initializing": (started - created).total_seconds(),
    }


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


async def _waiting(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute(
        "SELECT count(*) FROM builds WHERE status = 'queued' AND runner_id IS NULL"
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _assigned_times(conn: psycopg.AsyncConnection[Any], ids: list[str]) -> list[float]:
    cur = await conn.execute(
        "SELECT extract(epoch FROM assigned_at)::float8 FROM builds"
        " WHERE id = ANY(%s::uuid[]) AND assigned_at IS NOT NULL",
        (ids,),
    )
    return [float(r[0]) for r in await cur.fetchall()]
