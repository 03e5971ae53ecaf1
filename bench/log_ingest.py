"""Part 2: log ingest of a build that prints many short lines.

`conveyor up` runs a build of `seq 1 N`. Ingest rate: N lines over the time
from the build's first output line (its timestamp, taken by the runner as it
read the line) to the moment the last log batch was stored (the NOTIFY that
the store sends in the batch's transaction, seen by the bench). Then, as
soon as the build is final, `conveyor logs BUILD` is run as a child process
and timed until it has printed the whole log; the figure is the time from
the build's end (finished_at) to the CLI's exit.

A second size (200,000 lines, the Buildbot harness's `seq`) gives the figure
that compares with Buildbot: lines per second from the build's start
(started_at) to the whole log stored.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from bench.client import Api, Forge, Watcher
from bench.context import Context
from bench.figures import Figure, PartResult, at_least, at_most
from bench.gitrepo import Repo
from bench.processes import BenchError, ConveyorUp, UsageMeter
from control.storage.logs import decode_chunk

PART = "2 log ingest"
PEER_LINES = 200_000  # what the Buildbot harness's `log` builder prints


async def run(ctx: Context, lines: int = 1_000_000, runs: int = 3) -> PartResult:
    """Median of ``runs`` builds of ``seq 1 lines`` and of ``seq 1 200000``.
    Raises ``BenchError`` when a build fails or its stored log is short."""
    work = ctx.part_dir("logs")
    database_url = await ctx.postgres.new_database("logs")
    repo = Repo(work / "repo")
    big: list[dict[str, float]] = []
    peer: list[dict[str, float]] = []
    async with ConveyorUp(work, database_url, profile=ctx.profile("logs")) as up:
        await up.start()
        api = Api(up.grpc_address, up.token)
        watcher = await Watcher(database_url).start()
        forges: list[Forge] = []
        try:
            for size, out in ((lines, big), (PEER_LINES, peer)):
                project = await api.create_project(f"seq-{size}", str(repo.path), f"seq 1 {size}")
                forge = Forge(up.http_url, project)
                forges.append(forge)
                for i in range(runs):
                    sha = repo.commit("main", f"log {size} {i}")
                    out.append(await _one(up, api, forge, watcher, sha, size, work))
                    await asyncio.sleep(0.5)
        finally:
            for forge in forges:
                await forge.close()
            await watcher.close()
            await api.close()
    med = {k: statistics.median(r[k] for r in big) for k in big[0]}
    med_peer = {k: statistics.median(r[k] for r in peer) for k in peer[0]}
    return PartResult(
        "logs",
        [
            Figure(
                PART,
                f"ingest, first line → last stored ({lines:,} lines)",
                med["ingest_lines_per_s"],
                "lines/s",
                at_least(250_000),
                lower_is_better=False,
                note=f"median of {runs}; {med['ingest_s']:.2f} s; CPU s: control plane"
                f" {med['control_cpu_s']:.1f}, runner {med['runner_cpu_s']:.1f}",
            ),
            Figure(
                PART,
                f"build start → whole log stored ({lines:,} lines)",
                med["start_to_stored_s"],
                "s",
            ),
            Figure(
                PART,
                "build end → `conveyor logs` printed it all",
                med["cli_after_end_s"],
                "s",
                at_most(1.0),
                note=f"CLI run alone: {med['cli_s']:.2f} s",
            ),
            Figure(
                PART,
                "build end → whole log read over gRPC (in-process)",
                med["grpc_after_end_s"],
                "s",
            ),
            Figure(
                PART,
                f"build start → log readable ({PEER_LINES:,} lines)",
                med_peer["start_lines_per_s"],
                "lines/s",
                lower_is_better=False,
                note=f"median of {runs}; {med_peer['start_to_stored_s']:.2f} s",
                peer_key="log_lines_per_s",
            ),
        ],
        {"big": big, "peer_size": peer},
    )


async def _one(
    up: ConveyorUp, api: Api, forge: Forge, watcher: Watcher, sha: str, size: int, work: Path
) -> dict[str, float]:
    control = UsageMeter([up.pid])
    runner = UsageMeter([pid] if (pid := up.runner_pid()) else [])
    control.start()
    runner.start()
    _t0, build_id = await forge.push("main", sha)
    await watcher.wait_final([build_id], 600)
    seen_final = time.time()
    control_cpu, runner_cpu = control.stop(), runner.stop()
    cli_s, cli_lines = await _cli_read(up, build_id, work)
    cli_done = seen_final + cli_s
    began = time.perf_counter()
    grpc_lines = await api.read_log(build_id)
    grpc_s = time.perf_counter() - began
    (row,) = await watcher.times([build_id])
    if row.status != "succeeded":
        raise BenchError(f"log build {build_id} ended {row.status}")
    if cli_lines != row.log_lines or grpc_lines != row.log_lines or row.log_lines < size:
        raise BenchError(
            f"log of {build_id}: stored {row.log_lines}, CLI printed {cli_lines},"
            f" gRPC read {grpc_lines}, expected more than {size}"
        )
    first = await _first_output_time(watcher, build_id)
    stored = watcher.log_batches[build_id][-1]
    started, finished = row.at("started"), row.at("finished")
    return {
        "ingest_s": stored - first,
        "ingest_lines_per_s": size / (stored - first),
        "start_to_stored_s": stored - started,
        "start_lines_per_s": size / (stored - started),
        "end_to_seen_s": seen_final - finished,
        "cli_s": cli_s,
        "cli_after_end_s": cli_done - finished,
        "grpc_s": grpc_s,
        # The gRPC read runs after the CLI; as if it had started at the end.
        "grpc_after_end_s": seen_final - finished + grpc_s,
        "batches": float(len(watcher.log_batches[build_id])),
        "control_cpu_s": control_cpu.cpu_percent * control_cpu.seconds / 100,
        "runner_cpu_s": runner_cpu.cpu_percent * runner_cpu.seconds / 100,
        "push_to_final_s": control_cpu.seconds,
        "stored_lines": float(row.log_lines),
    }


async def _cli_read(up: ConveyorUp, build_id: str, work: Path) -> tuple[float, int]:
    """Run `conveyor logs BUILD` to a file; return (seconds, lines printed)."""
    out_path = work / f"logs-{build_id}.txt"
    began = time.perf_counter()
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conveyor_cli.main", "--data-dir", str(up.data_dir),
            "logs", build_id,
            stdout=out, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 300)
    took = time.perf_counter() - began
    if proc.returncode != 0:
        raise BenchError(f"conveyor logs {build_id} exited {proc.returncode}: {err.decode()}")
    count = await asyncio.to_thread(_count_lines, out_path)
    out_path.unlink()
    return took, count


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


async def _first_output_time(watcher: Watcher, build_id: str) -> float:
    """When the runner read the build's first output line ("1" of seq)."""
    cur = await watcher.db().execute(
        "SELECT first_line, data FROM log_chunks WHERE build_id = %s ORDER BY first_line LIMIT 4",
        (build_id,),
    )
    for first_line, data in await cur.fetchall():
        for line in decode_chunk(int(first_line), data):
            if line.stream == "stdout" and line.text == "1":
                return line.time_ms / 1000
    raise BenchError(f"log of {build_id} has no line '1' near its start")
