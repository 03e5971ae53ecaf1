"""Part 3: live tail latency, with one follower and with many on one build.

`conveyor up` runs a build that prints ``tick <unix time>`` lines at a steady
rate (bash's $EPOCHREALTIME: no fork per line). Followers are
`StreamLogs(follow=True)` calls held by separate processes (bench.follower),
so that decoding their messages does not share an event loop with the
measurement. Latency = the follower's arrival time minus the time written in
the line (one clock: same machine).

So that every follower sees every line live, the build waits for a gate
file in its repository (which the sandbox sees read-only) before it prints:
the bench creates the file once the control plane's
`conveyor_log_streams_active` gauge shows every follower attached. The
control plane's CPU is read over the printing window.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bench.client import Api, Forge, Watcher, scrape
from bench.context import Context
from bench.figures import Figure, PartResult, at_most, summary
from bench.gitrepo import Repo
from bench.processes import BenchError, ConveyorUp, UsageMeter, poll

PART = "3 live tail"
REPO_ROOT = Path(__file__).resolve().parent.parent
FOLLOWERS_PER_PROCESS = 250
TARGET_MS = {1: 250.0, 500: 500.0}


def build_command(gate: Path, lines: int, interval: float) -> str:
    wait = f"for i in $(seq 1 2400); do [ -e {gate} ] && break; sleep 0.05; done"
    tick = 'printf "tick %s\\n" "$EPOCHREALTIME"'
    ticks = f"for i in $(seq 1 {lines}); do {tick}; sleep {interval}; done"
    return f"{wait}; {ticks}"


async def run(
    ctx: Context, followers: tuple[int, ...] = (1, 500), seconds: float = 20, rate: float = 10
) -> PartResult:
    """For each follower count, one build printing ``rate`` lines/s for
    ``seconds``. Raises ``BenchError`` when a follower fails or misses lines."""
    work = ctx.part_dir("tail")
    database_url = await ctx.postgres.new_database("tail")
    repo = Repo(work / "repo")
    lines = round(seconds * rate)
    figures: list[Figure] = []
    raw: dict[str, Any] = {"lines_per_build": lines, "rate": rate}
    async with ConveyorUp(work, database_url, profile=ctx.profile("tail")) as up:
        await up.start()
        api = Api(up.grpc_address, up.token)
        watcher = await Watcher(database_url).start()
        try:
            for count in followers:
                gate = repo.path / f".go-{count}"
                project = await api.create_project(
                    f"tail-{count}", str(repo.path), build_command(gate, lines, 1 / rate)
                )
                forge = Forge(up.http_url, project)
                try:
                    result = await _one(up, forge, watcher, repo, gate, count, lines)
                finally:
                    await forge.close()
                raw[f"followers_{count}"] = result
                figures += _figures(count, result)
        finally:
            await watcher.close()
            await api.close()
    return PartResult("tail", figures, raw)


async def _one(
    up: ConveyorUp, forge: Forge, watcher: Watcher, repo: Repo, gate: Path, count: int, lines: int
) -> dict[str, float]:
    sha = repo.commit("main", f"tail {count}")
    _t0, build_id = await forge.push("main", sha)
    procs = []
    for first in range(0, count, FOLLOWERS_PER_PROCESS):
        n = min(FOLLOWERS_PER_PROCESS, count - first)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.follower", up.grpc_address, up.token, build_id,
            str(n), cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
    try:
        await _wait_streams(up.http_url, count, 60)
        meter = UsageMeter([up.pid])
        clients = UsageMeter([p.pid for p in procs])
        meter.start()
        clients.start()
        await asyncio.to_thread(gate.touch)
        await watcher.wait_final([build_id], lines + 120)
        usage, client_usage = meter.stop(), clients.stop()
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 120)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    samples: list[float] = []
    for proc, (out, _) in zip(procs, outputs, strict=True):
        data = json.loads(out or b"{}")
        if proc.returncode != 0 or not data:
            raise BenchError(f"a follower process failed: {data.get('errors') if data else out!r}")
        samples += [latency for _written, latency in data["samples"]]
    if len(samples) != count * lines:
        raise BenchError(f"followers got {len(samples)} tick lines, expected {count * lines}")
    stats = summary([s * 1000 for s in samples])
    return {
        **stats,
        "cpu_percent": usage.cpu_percent,
        "rss_mb": usage.rss_mb,
        "follower_processes_cpu_percent": client_usage.cpu_percent,
    }


async def _wait_streams(http_url: str, count: int, within: float) -> None:
    """Wait until the control plane reports ``count`` open StreamLogs calls."""
    seen = 0.0

    async def attached() -> bool:
        nonlocal seen
        seen = (await scrape(http_url)).get("conveyor_log_streams_active", 0.0)
        return seen >= count

    if not await poll(attached, within, every=0.1):
        raise BenchError(f"only {seen:.0f} of {count} followers attached within {within:.0f} s")


def _figures(count: int, r: dict[str, float]) -> list[Figure]:
    who = "1 follower" if count == 1 else f"{count} followers"
    target = TARGET_MS.get(count)
    note = f"n={r['n']:.0f} lines"
    return [
        Figure(PART, f"write → follower p50, {who}", r["p50"], "ms", note=note),
        Figure(PART, f"write → follower p99, {who}", r["p99"], "ms",
               at_most(target) if target else None),
        Figure(PART, f"write → follower max, {who}", r["max"], "ms"),
        Figure(PART, f"control-plane CPU, {who}", r["cpu_percent"], "% of a core",
               note=f"the followers' own processes: {r['follower_processes_cpu_percent']:.0f} %"),
    ]  # fmt: skip
