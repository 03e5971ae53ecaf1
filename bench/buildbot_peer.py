"""Part 7: Buildbot 4.3, the peer, measured on this machine in the same run.

The harness in ../shared/peers/buildbot/ (read-only here) installs Buildbot
from PyPI into $BUILDBOT_PEER_DIR on first use, starts a master and a worker
(`run.sh`), measures push → started/finished, log ingest and a burst
(`bench.py`, which writes a results JSON) and is stopped by `stop.sh`. This
module runs the three, parses the JSON and returns the figures that the
Conveyor parts compare with. Conveyor is not running while Buildbot is.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bench.processes import BenchError

DEFAULT_HARNESS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "buildbot"
SETUP_TIMEOUT = 1800.0  # a first run installs Buildbot from PyPI
BENCH_TIMEOUT = 1800.0


async def _run(args: list[str], cwd: Path, log: Path, within: float) -> str:
    """Run a harness command; return its stdout. Raises ``BenchError`` with
    the log's path when it fails or overruns ``within`` seconds."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"{' '.join(args)} ran over {within:.0f} s") from None
    text = out.decode(errors="replace")
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(args)}\n{text}\n")
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(args)} exited {proc.returncode}; see {log}")
    return text


async def run(
    work_dir: Path,
    harness: Path = DEFAULT_HARNESS,
    latency_reps: int = 50,
    log_reps: int = 3,
    burst: int = 50,
) -> dict[str, Any]:
    """Set up, run and stop the Buildbot peer; return its results JSON."""
    if not (harness / "run.sh").exists():
        raise BenchError(f"no Buildbot harness at {harness}")
    log = work_dir / "buildbot.log"
    state = Path(os.environ.get("BUILDBOT_PEER_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) /
                 "buildbot-peer")  # fmt: skip
    try:
        await _run(["bash", str(harness / "run.sh")], harness, log, SETUP_TIMEOUT)
        out = await _run(
            [
                str(state / "venv" / "bin" / "python"), str(harness / "bench.py"),
                "--latency-reps", str(latency_reps), "--log-reps", str(log_reps),
                "--concurrency", str(burst), "--only", "latency", "log", "concurrency",
            ],
            harness, log, BENCH_TIMEOUT,
        )  # fmt: skip
    finally:
        await _run(["bash", str(harness / "stop.sh")], harness, log, 120)
    for line in out.splitlines():
        if line.startswith("results written to "):
            path = Path(line.removeprefix("results written to ").strip())
            data: dict[str, Any] = json.loads(await asyncio.to_thread(path.read_text))
            data["results_file"] = str(path)
            return data
    raise BenchError(f"the Buildbot harness wrote no results; see {log}")


def peer_figures(data: dict[str, Any]) -> dict[str, float]:
    """The Buildbot figures the Conveyor figures compare with, by key."""
    lat = data["latency"]
    logs = data["log"]["median_quiet"]
    conc = data["concurrency"]
    return {
        "push_started_p50_ms": lat["push_to_started"]["p50"] * 1000,
        "push_finished_p50_ms": lat["push_to_finished"]["p50"] * 1000,
        "log_lines_per_s": logs["lines_per_s_log_readable"],
        "log_lines": float(data["log"]["n_lines"]),
        "burst_all_finished_s": conc["all_finished_s"],
        "burst_lost": float(conc["lost"]),
    }
