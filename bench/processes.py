"""The processes a benchmark runs: PostgreSQL, `conveyor up`, `conveyor
control serve`, and the CPU/memory readings taken of them.

Each Conveyor process is a real child started the way an operator starts it;
its stdout/stderr go to a log file in the bench's work directory, which the
error messages name. ``stop`` is always called (the parts use ``async with``)
so no child outlives the benchmark.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil
import psycopg

from bench.profiling import Profiler
from control.storage.embedded import EmbeddedPostgres

START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


class BenchError(RuntimeError):
    """A benchmark could not run; the message says what and where to look."""


class Postgres:
    """The benchmark's PostgreSQL: an embedded server of its own in
    ``data_dir`` (the same server and tuning that `conveyor up` starts), or
    an existing server at ``url``. Each part gets a fresh database."""

    def __init__(self, data_dir: Path | None = None, url: str = "") -> None:
        if (data_dir is None) == (not url):
            raise ValueError("give either data_dir or url")
        self.server = EmbeddedPostgres(data_dir) if data_dir is not None else None
        self.url = url

    async def start(self) -> str:
        if self.server is not None:
            self.url = await asyncio.to_thread(self.server.start)
        return self.url

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)

    async def new_database(self, prefix: str) -> str:
        """Create an empty database; return its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            await conn.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = self.url.rpartition("/")
        return f"{base}/{name}"

    def backend_pids(self) -> list[int]:
        """PIDs of the server and its backends (for CPU readings); none for
        a server that is not ours."""
        if self.server is None:
            return []
        pid_file = self.server.data_dir / "postmaster.pid"
        try:
            root = psutil.Process(int(pid_file.read_text().splitlines()[0]))
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except (OSError, ValueError, IndexError, psutil.Error):
            return []


async def poll(
    predicate: Callable[[], Awaitable[bool]], within: float, every: float = 0.05
) -> bool:
    """Call ``predicate`` every ``every`` seconds until it is true (return
    True) or ``within`` seconds have passed (return False)."""
    deadline = time.monotonic() + within
    while True:
        if await predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)


async def _wait_for(
    predicate: Callable[[], Awaitable[bool]], what: str, log: Path, within: float
) -> None:
    if not await poll(predicate, within):
        raise BenchError(f"{what} within {within:.0f} s; see {log}")


async def connected_runners(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM runners WHERE connected")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


class _Child:
    """A child process in its own session, logging to ``log_path``; with a
    ``profile`` path prefix, py-spy records it (bench.profiling)."""

    def __init__(self, log_path: Path, profile: Path | None = None) -> None:
        self.log_path = log_path
        self.profile = profile
        self.proc: asyncio.subprocess.Process | None = None
        self.profilers: list[Profiler] = []

    async def _profile(self, pid: int | None, what: str) -> None:
        if self.profile is None or pid is None:
            return
        profiler = Profiler(pid, self.profile.with_name(f"{self.profile.name}-{what}.txt"))
        await profiler.start()
        self.profilers.append(profiler)

    async def _spawn(self, args: list[str], env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conveyor_cli.main", *args,
                env=env, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the process was not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``; waits for the exit."""
        for profiler in self.profilers:
            await profiler.stop()
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class ConveyorUp(_Child):
    """`conveyor up --no-demo` on ports 0 against ``database_url``: the
    control plane in this process plus one runner agent child with
    ``capacity`` slots and the local (bubblewrap) launcher."""

    def __init__(
        self, work_dir: Path, database_url: str, capacity: int = 6, profile: Path | None = None
    ) -> None:
        super().__init__(work_dir / "up.log", profile)
        self.data_dir = work_dir / "up"
        self.database_url = database_url
        self.capacity = capacity
        self.state: dict[str, str] = {}

    async def start(self) -> ConveyorUp:
        env = {**os.environ, "CONVEYOR_DATABASE_URL": self.database_url}
        await self._spawn(
            [
                "up", "--data-dir", str(self.data_dir), "--grpc-port", "0", "--http-port", "0",
                "--no-demo", "--capacity", str(self.capacity), "--log-format", "json",
            ],
            env,
        )  # fmt: skip
        state_file = self.data_dir / "conveyor.json"

        async def written() -> bool:
            if not self.alive():
                raise BenchError(f"conveyor up exited early; see {self.log_path}")
            if not state_file.exists():
                return False
            try:
                self.state = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                return False
            return "grpc_address" in self.state

        async def runner_up() -> bool:
            if not self.alive():
                raise BenchError(f"conveyor up exited early; see {self.log_path}")
            return await connected_runners(self.database_url) >= 1

        await _wait_for(written, "conveyor up did not write conveyor.json", self.log_path,
                        START_TIMEOUT)  # fmt: skip
        await _wait_for(runner_up, "the runner of conveyor up did not connect", self.log_path,
                        START_TIMEOUT)  # fmt: skip
        await self._profile(self.pid, "control")
        await self._profile(self.runner_pid(), "runner")
        return self

    @property
    def grpc_address(self) -> str:
        return self.state["grpc_address"]

    @property
    def http_url(self) -> str:
        return self.state["http_url"]

    @property
    def token(self) -> str:
        return self.state["token"]

    def runner_pid(self) -> int | None:
        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return None
        return children[0].pid if children else None


class ControlServe(_Child):
    """`conveyor control serve` on ports 0 against ``database_url``, with
    fresh admin and runner tokens; the runners are the caller's."""

    def __init__(
        self, work_dir: Path, database_url: str, profile: Path | None = None, **env: str
    ) -> None:
        super().__init__(work_dir / "control.log", profile)
        self.database_url = database_url
        self.admin_token = f"cvy_{secrets.token_urlsafe(24)}"
        self.runner_token = f"cvr_{secrets.token_urlsafe(24)}"
        self.extra_env = env
        self.grpc_address = ""
        self.http_url = ""

    async def start(self) -> ControlServe:
        env = {
            **os.environ,
            "CONVEYOR_DATABASE_URL": self.database_url,
            "CONVEYOR_ADMIN_TOKEN": self.admin_token,
            "CONVEYOR_RUNNER_TOKEN": self.runner_token,
            **self.extra_env,
        }
        await self._spawn(
            ["control", "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
             "--log-format", "json"],
            env,
        )  # fmt: skip

        async def serving() -> bool:
            if not self.alive():
                raise BenchError(f"conveyor control serve exited early; see {self.log_path}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "control plane serving gRPC on" not in line:
                    continue
                words = json.loads(line)["message"].split()
                self.grpc_address, self.http_url = words[5], words[-1]
                return True
            return False

        await _wait_for(serving, "the control plane did not start", self.log_path,
                        START_TIMEOUT)  # fmt: skip
        await self._profile(self.pid, "control")
        return self


@dataclass(frozen=True)
class Usage:
    """CPU (share of one core) and resident memory over a window."""

    seconds: float
    cpu_percent: float
    rss_mb: float


class UsageMeter:
    """Reads a set of processes' CPU time and RSS at the start and end of a
    window. Processes that exit in between count with what they used."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = []
        for pid in pids:
            try:
                self.procs.append(psutil.Process(pid))
            except psutil.Error:
                continue
        self._cpu0 = 0.0
        self._t0 = 0.0

    def _cpu(self) -> float:
        total = 0.0
        for proc in self.procs:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def rss_mb(self) -> float:
        total = 0
        for proc in self.procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total / (1024 * 1024)

    def start(self) -> None:
        self._cpu0 = self._cpu()
        self._t0 = time.monotonic()

    def stop(self) -> Usage:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        return Usage(elapsed, 100.0 * (self._cpu() - self._cpu0) / elapsed, self.rss_mb())
