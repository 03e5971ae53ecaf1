"""Part 1: push → initializing / running / finished of a trivial build.

`conveyor up` (control plane + one runner agent with the local bubblewrap
launcher) runs against its own database. The project builds `true` after the
clone of a small local repository. For each sample a new commit is made on
main, t0 is taken right before the POST of a signed GitHub push webhook, and
the build's own timestamps (started_at, running_at, finished_at: the same
machine's clock) give the three latencies. Builds run one at a time, 0.2 s
apart, after a warm-up.
"""

from __future__ import annotations

import asyncio
import time

from bench.client import Api, Forge, Watcher
from bench.context import Context
from bench.figures import Figure, PartResult, at_most, summary
from bench.gitrepo import Repo
from bench.processes import BenchError, ConveyorUp

PART = "1 push→build"
PAUSE = 0.2  # between samples, as the Buildbot harness does


async def run(ctx: Context, builds: int = 50, warmup: int = 5) -> PartResult:
    """Measure ``builds`` trivial builds after ``warmup`` unmeasured ones.
    Raises ``BenchError`` when a build does not succeed."""
    work = ctx.part_dir("push")
    database_url = await ctx.postgres.new_database("push")
    repo = Repo(work / "repo")
    samples: dict[str, list[float]] = {
        k: [] for k in ("received", "webhook", "initializing", "running", "finished", "seen")
    }
    failed: list[str] = []
    async with ConveyorUp(work, database_url, profile=ctx.profile("push")) as up:
        await up.start()
        api = Api(up.grpc_address, up.token)
        watcher = await Watcher(database_url).start()
        forge: Forge | None = None
        try:
            project = await api.create_project("trivial", str(repo.path), "true")
            forge = Forge(up.http_url, project)
            for i in range(warmup + builds):
                sha = repo.commit("main", f"push {i}")
                t0, build_id = await forge.push("main", sha)
                t_reply = time.time()
                await watcher.wait_final([build_id], 60)
                (row,) = await watcher.times([build_id])
                if row.commit_sha != sha:
                    raise BenchError(f"build {build_id} built {row.commit_sha}, not {sha}")
                if i < warmup:
                    continue
                if row.status != "succeeded":
                    # Counted and shown, not timed: a broken build says
                    # nothing about the path from push to build.
                    failed.append(f"{build_id} {row.status}: {row.reason[:200]}")
                    if len(failed) > builds // 10:
                        raise BenchError(f"{len(failed)} builds did not succeed: {failed}")
                    continue
                samples["received"].append(row.at("received") - t0)
                samples["webhook"].append(t_reply - t0)
                samples["initializing"].append(row.at("started") - t0)
                samples["running"].append(row.at("running") - t0)
                samples["finished"].append(row.at("finished") - t0)
                samples["seen"].append(watcher.final_at[build_id] - t0)
                await asyncio.sleep(PAUSE)
        finally:
            if forge is not None:
                await forge.close()
            await watcher.close()
            await api.close()
    raw: dict[str, object] = {k: summary(v) for k, v in samples.items()}
    raw["failed"] = failed
    return PartResult("push", [*figures(samples), _failures(builds, failed)], raw)


def _failures(builds: int, failed: list[str]) -> Figure:
    note = f"first: {failed[0]}" if failed else ""
    return Figure(PART, f"builds that did not succeed, of {builds}", float(len(failed)),
                  "builds", at_most(0), note=note)  # fmt: skip


def figures(samples: dict[str, list[float]]) -> list[Figure]:
    ms = {k: {q: v * 1000 for q, v in summary(s).items() if q != "n"} for k, s in samples.items()}
    n = len(samples["finished"])
    note = f"n={n}"
    return [
        Figure(PART, "push → initializing p50", ms["initializing"]["p50"], "ms", at_most(50),
               note=note, peer_key="push_started_p50_ms"),
        Figure(PART, "push → initializing p95", ms["initializing"]["p95"], "ms"),
        Figure(PART, "push → initializing p99", ms["initializing"]["p99"], "ms", at_most(200)),
        Figure(PART, "push → initializing max", ms["initializing"]["max"], "ms"),
        Figure(PART, "push → running p50", ms["running"]["p50"], "ms"),
        Figure(PART, "push → running p99", ms["running"]["p99"], "ms"),
        Figure(PART, "push → finished p50", ms["finished"]["p50"], "ms", at_most(400),
               peer_key="push_finished_p50_ms"),
        Figure(PART, "push → finished p95", ms["finished"]["p95"], "ms"),
        Figure(PART, "push → finished p99", ms["finished"]["p99"], "ms"),
        Figure(PART, "push → finished max", ms["finished"]["max"], "ms"),
        Figure(PART, "webhook answered (202) p50", ms["webhook"]["p50"], "ms"),
    ]  # fmt: skip
