"""`python -m bench.failover`: kill -9 of a control-plane replica mid-build.

Two `conveyor control serve` replicas on one embedded PostgreSQL, one real
runner agent given both addresses (`--control A,B`), a build printing a line
every 50 ms. The replica holding the runner's stream is killed with SIGKILL;
the bench measures, from the kill, when the runner is registered on the
other replica and when the next log line is stored, then checks the build
finished with every line exactly once. Prints one table (min, median, max
over the runs). Exit status: 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psycopg

from bench.client import Api
from bench.gitrepo import Repo
from bench.processes import BenchError, ControlServe, Postgres, _Child, connected_runners, poll
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb

LINES = 100
BUILD = f'for i in $(seq 1 {LINES}); do echo "line $i"; sleep 0.05; done'
WITHIN = 30.0


class Runner(_Child):
    """`conveyor runner start` given every replica's address."""

    def __init__(self, work_dir: Path, addresses: str, token: str) -> None:
        super().__init__(work_dir / "runner.log")
        self.work_dir = work_dir / "runner"
        self.addresses = addresses
        self.token = token

    async def start(self) -> Runner:
        await self._spawn(
            ["runner", "start", "--control", self.addresses, "--work-dir", str(self.work_dir),
             "--capacity", "1", "--log-format", "text"],
            {**os.environ, "CONVEYOR_RUNNER_TOKEN": self.token},
        )  # fmt: skip
        return self


async def _value(url: str, sql: str, *params: object) -> object:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        row = await cur.fetchone()
    return row[0] if row else None


async def _since(began: float, url: str, sql: str, *params: object) -> float:
    async def holds() -> bool:
        return bool(await _value(url, sql, *params))

    if not await poll(holds, WITHIN, every=0.01):
        raise BenchError(f"{sql!r} did not hold within {WITHIN:.0f} s after the kill")
    return time.monotonic() - began


async def one_run(postgres: Postgres, work: Path) -> tuple[float, float]:
    """One kill; return (runner registered, first new line stored) in
    seconds after it. Raises ``BenchError`` when the build lost or repeated
    a line, or did not finish."""
    url = await postgres.new_database("failover")
    # The build clones a repository in the bench's temp directory.
    first = ControlServe(work / "a", url, CONVEYOR_LOCAL_REPOSITORIES="allow")
    second = ControlServe(work / "b", url, CONVEYOR_LOCAL_REPOSITORIES="allow")
    second.admin_token, second.runner_token = first.admin_token, first.runner_token
    async with first, second:
        await first.start()
        await second.start()
        async with await Runner(
            work, f"{first.grpc_address},{second.grpc_address}", first.runner_token
        ).start() as runner:

            async def registered() -> bool:
                if not runner.alive():
                    raise BenchError(f"the runner exited; see {runner.log_path}")
                return await connected_runners(url) == 1

            if not await poll(registered, WITHIN):
                raise BenchError(f"the runner did not register; see {runner.log_path}")
            holder = next(
                (r for r in (first, second) if "connected, capacity" in r.log_path.read_text()),
                first,
            )
            survivor = second if holder is first else first
            api = Api(holder.grpc_address, first.admin_token)
            try:
                await api.create_project("numbers", str(Repo(work / "repo").path), BUILD)
                reply = await api.config.TriggerBuild(
                    cs.TriggerBuildRequest(project="numbers"), metadata=api.metadata, timeout=30
                )
            finally:
                await api.close()
            build_id = reply.build.id
            if not await poll(
                lambda: _lines_over(url, build_id, 10), WITHIN, every=0.02
            ):  # the build is printing
                raise BenchError(f"the build did not start; see {runner.log_path}")

            killed_at = await _value(url, "SELECT clock_timestamp()")
            assert isinstance(killed_at, datetime)
            began = time.monotonic()
            assert holder.proc is not None
            os.killpg(holder.proc.pid, signal.SIGKILL)
            await holder.proc.wait()
            stored = await _value(url, "SELECT log_lines FROM builds WHERE id = %s", build_id)
            reconnected, resumed = await asyncio.gather(
                _since(began, url, "SELECT bool_or(connected_at > %s) FROM runners", killed_at),
                _since(
                    began, url, "SELECT log_lines > %s FROM builds WHERE id = %s", stored, build_id
                ),
            )
            await _check_finished(Api(survivor.grpc_address, first.admin_token), build_id)
    return reconnected, resumed


async def _lines_over(url: str, build_id: str, count: int) -> bool:
    return bool(
        await _value(url, "SELECT log_lines > %s FROM builds WHERE id = %s", count, build_id)
    )


async def _check_finished(api: Api, build_id: str) -> None:
    try:
        deadline = time.monotonic() + WITHIN
        build = await api.get(build_id)
        unfinished = (pb.BUILD_STATUS_QUEUED, pb.BUILD_STATUS_INITIALIZING, pb.BUILD_STATUS_RUNNING)
        while build.status in unfinished:
            if time.monotonic() > deadline:
                raise BenchError(f"build {build_id} did not finish within {WITHIN:.0f} s")
            await asyncio.sleep(0.1)
            build = await api.get(build_id)
        if build.status != pb.BUILD_STATUS_SUCCEEDED:
            raise BenchError(f"build {build_id} ended {pb.BuildStatus.Name(build.status)}")
        texts: list[str] = []
        async for message in api.builds.StreamLogs(
            bm.StreamLogsRequest(build_id=build_id),
            metadata=api.metadata,
            timeout=60,
        ):
            texts.extend(line.text for line in message.lines)
        printed = [t for t in texts if t.startswith("line ")]
        if printed != [f"line {i}" for i in range(1, LINES + 1)]:
            raise BenchError(f"build {build_id}: lines lost or repeated: {printed}")
    finally:
        await api.close()


def _row(name: str, values: list[float]) -> str:
    return f"{name:<44} {min(values):>6.2f} {statistics.median(values):>8.2f} {max(values):>6.2f}"


async def main(runs: int) -> int:
    with tempfile.TemporaryDirectory(prefix="conveyor-failover-") as tmp:
        root = Path(tmp)
        postgres = Postgres(root / "postgres")
        await postgres.start()
        reconnects: list[float] = []
        resumes: list[float] = []
        try:
            for index in range(runs):
                reconnected, resumed = await one_run(postgres, root / f"run{index}")
                reconnects.append(reconnected)
                resumes.append(resumed)
                print(f"run {index + 1}: runner {reconnected:.2f} s, log {resumed:.2f} s",
                      file=sys.stderr)  # fmt: skip
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await postgres.stop()
    print(f"kill -9 of the runner's replica, {runs} runs (seconds after the kill)")
    print(f"{'':<44} {'min':>6} {'median':>8} {'max':>6}")
    print(_row("runner registered on the other replica", reconnects))
    print(_row("first new log line stored", resumes))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="kills to measure (default 3)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    sys.exit(asyncio.run(main(args.runs)))
