"""Part 5: a burst of pushes at once to one project with 6 build slots.

`conveyor up` with one runner of 6 slots (and the account's default limit
of 6). Each push goes to its own branch: Conveyor supersedes a queued build
when a newer push arrives on the same branch (by design), so distinct
branches are what "none lost or merged" can be checked on; the Buildbot
harness likewise builds every push (collapseRequests=False). All webhook
connections are opened first, then the POSTs leave together at t0; the
figure is t0 → the last build's final state seen by the bench, and every
pushed commit must have its own succeeded build.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from bench.client import Api, Forge, Watcher
from bench.context import Context
from bench.figures import Figure, PartResult, at_most, summary
from bench.gitrepo import Repo
from bench.processes import ConveyorUp, UsageMeter

PART = "5 burst"


async def run(ctx: Context, pushes: int = 50) -> PartResult:
    work = ctx.part_dir("burst")
    database_url = await ctx.postgres.new_database("burst")
    repo = Repo(work / "repo")
    async with ConveyorUp(work, database_url, capacity=6, profile=ctx.profile("burst")) as up:
        await up.start()
        api = Api(up.grpc_address, up.token)
        watcher = await Watcher(database_url).start()
        forge: Forge | None = None
        try:
            project = await api.create_project("burst", str(repo.path), "true")
            forge = Forge(up.http_url, project)
            # Warm-up: one build, so the first clone's costs are not counted.
            _t, warm = await forge.push("main", repo.commit("main", "warm-up"))
            await watcher.wait_final([warm], 60)
            branches = [f"burst-{i}" for i in range(pushes)]
            shas = repo.commit_many(branches, "burst")
            signed = [forge.signed(b, shas[b]) for b in branches]
            control = UsageMeter([up.pid])
            runner = UsageMeter([pid] if (pid := up.runner_pid()) else [])
            control.start()
            runner.start()
            t0 = time.time()
            ids = await asyncio.gather(*(forge.post(body, headers) for body, headers in signed))
            answered = time.time() - t0
            await watcher.wait_final(ids, 600)
            control_usage, runner_usage = control.stop(), runner.stop()
            rows = await watcher.times(ids)
        finally:
            if forge is not None:
                await forge.close()
            await watcher.close()
            await api.close()
    built = {r.commit_sha for r in rows if r.status == "succeeded"}
    lost = pushes - len(built & set(shas.values()))
    merged = sum(1 for r in rows if r.status == "superseded")
    all_seen = max(watcher.final_at[b] for b in ids) - t0
    all_finished = max(r.at("finished") for r in rows) - t0
    per_build = summary([r.at("finished") - t0 for r in rows if r.finished])
    raw = {
        "pushes": pushes,
        "distinct_builds": len(set(ids)),
        "succeeded": sum(1 for r in rows if r.status == "succeeded"),
        "lost": lost,
        "superseded": merged,
        "statuses": dict(Counter(r.status for r in rows)),
        "all_answered_s": answered,
        "all_final_seen_s": all_seen,
        "all_finished_s": all_finished,
        "push_to_finished": per_build,
        "control_cpu_percent": control_usage.cpu_percent,
        "runner_agent_cpu_percent": runner_usage.cpu_percent,
    }
    figures = [
        Figure(
            PART,
            f"{pushes} pushes on 6 slots: all finished",
            all_seen,
            "s",
            at_most(8),
            note=f"all {pushes} webhooks answered in {answered:.2f} s; CPU: control plane"
            f" {control_usage.cpu_percent:.0f} %, runner agent {runner_usage.cpu_percent:.0f} %",
            peer_key="burst_all_finished_s",
        ),
        Figure(
            PART,
            "pushes without their own succeeded build",
            float(lost),
            "pushes",
            at_most(0),
            note=", ".join(f"{n} {s}" for s, n in sorted(Counter(r.status for r in rows).items())),
            peer_key="burst_lost",
        ),
    ]  # fmt: skip
    return PartResult("burst", figures, raw)
