"""The control plane as its own process on fixed ports, for tests that kill
it with SIGKILL and start it again where runners and clients look for it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import psycopg

from conveyor.v1 import types_pb2 as pb
from tests.helpers import FINAL, Api


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ControlProcess:
    """``conveyor control serve`` as a child process in its own session. The
    ports are chosen once, so every ``start`` serves on the same ones."""

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        *,
        runner_lost: float = 3.0,
        heartbeat: float = 0.5,
        startup_deadline: float = 60.0,
    ) -> None:
        self.database_url = database_url
        self.log_path = log_path
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.admin_token = f"cvy_{secrets.token_urlsafe(16)}"
        self.runner_token = f"cvr_{secrets.token_urlsafe(16)}"
        self.env = {
            **os.environ,
            "CONVEYOR_DATABASE_URL": database_url,
            "CONVEYOR_ADMIN_TOKEN": self.admin_token,
            "CONVEYOR_RUNNER_TOKEN": self.runner_token,
            "CONVEYOR_STARTUP_DEADLINE_SECONDS": str(startup_deadline),
            "CONVEYOR_RUNNER_LOST_SECONDS": str(runner_lost),
            "CONVEYOR_HEARTBEAT_SECONDS": str(heartbeat),
            # The tests' repositories are local paths (one user).
            "CONVEYOR_LOCAL_REPOSITORIES": "allow",
        }
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def api(self) -> Api:
        return Api(self.grpc_address, self.admin_token)

    async def start(self, timeout: float = 30) -> float:
        """Start and wait until it serves; return how long that took (s)."""
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conveyor_cli.main", "control", "serve",
                "--grpc-addr", self.grpc_address, "--http-addr", f"127.0.0.1:{self.http_port}",
                "--log-format", "text",
                env=self.env, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - began < timeout:
                if self.proc.returncode is not None:
                    raise AssertionError(f"control plane exited:\n{self.log()[-3000:]}")
                try:
                    async with session.get(url) as reply:
                        if reply.status == 200:
                            return time.monotonic() - began
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.02)
        raise AssertionError(f"control plane did not serve within {timeout} s:\n{self.log()}")

    async def kill(self) -> None:
        """kill -9 the control plane and wait until it is gone."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def db_value(database_url: str, sql: str, *params: object) -> object:
    """One value from the database, on a connection of its own."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(sql, params)  # type: ignore[arg-type]
        row = await cur.fetchone()
    return row[0] if row else None


async def wait_for_text(api: Api, build_id: str, text: str, timeout: float = 30) -> None:
    """Wait until ``text`` is a line of the build's log; fail at once when
    the build ended without it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = await api.logs(build_id)
        if any(ln.text == text for ln in lines):
            return
        build = await api.get(build_id)
        if build.status in FINAL:
            raise AssertionError(
                f"build {build_id} ended {pb.BuildStatus.Name(build.status)}"
                f" ({build.status_reason}) without {text!r}: {[ln.text for ln in lines]}"
            )
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in the log of {build_id}")


async def wait_until(database_url: str, sql: str, *params: object, timeout: float = 30) -> float:
    """Poll until ``sql`` returns true; return how long it took (s)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if await db_value(database_url, sql, *params):
                return time.monotonic() - began
        except psycopg.OperationalError:
            pass
        await asyncio.sleep(0.02)
    raise AssertionError(f"{sql!r} did not hold within {timeout} s")


NUMBERED = 'for i in $(seq 1 {n}); do echo "line $i"; sleep 0.05; done'


def numbered(n: int) -> list[str]:
    return [f"line {i}" for i in range(1, n + 1)]


def unmount_under(root: Path) -> list[str]:
    """Unmount (lazily) whatever is still mounted below ``root`` and return
    the mount points: a runner killed with SIGKILL cannot unmount the
    workspaces of its builds itself."""
    prefix = str(root.resolve()) + "/"
    points = [
        fields[4]
        for fields in (
            line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()
        )
        if fields[4].startswith(prefix)
    ]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    return points


class UpTree:
    """``conveyor up`` (no demo, ports 0) as a child in its own session,
    with its output in files. ``database_url`` empty: its own embedded
    PostgreSQL. ``cleanup`` kills whatever of its tree is left, so a failing
    test leaves no process behind."""

    def __init__(self, tmp: Path, database_url: str = "", name: str = "up") -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.out_path = tmp / f"{name}.out"
        self.err_path = tmp / f"{name}.err"
        self.env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_DATABASE_URL"}
        if database_url:
            self.env["CONVEYOR_DATABASE_URL"] = database_url
        self.proc: asyncio.subprocess.Process | None = None
        self.seen: dict[int, psutil.Process] = {}

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "conveyor_cli.main", "up", "--data-dir", str(self.data_dir),
            "--grpc-port", "0", "--http-port", "0", "--no-demo", "--capacity", "2",
        ]  # fmt: skip

    async def start(self) -> dict[str, str]:
        """Start it and return its conveyor.json once it serves."""
        with self.out_path.open("ab") as out, self.err_path.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(), env=self.env, stdout=out, stderr=err, start_new_session=True
            )
        began = time.monotonic()
        while time.monotonic() - began < 60:
            if self.proc.returncode is not None:
                raise AssertionError(f"conveyor up exited {self.proc.returncode}:\n{self.log()}")
            if "Conveyor is up." in self.out_path.read_text(errors="replace"):
                state: dict[str, str] = json.loads((self.data_dir / "conveyor.json").read_text())
                self.remember()
                return state
            await asyncio.sleep(0.05)
        raise AssertionError(f"conveyor up did not serve within 60 s:\n{self.log()}")

    def remember(self) -> list[psutil.Process]:
        """The processes of its tree now (its children, theirs, and the
        PostgreSQL server detached by pg_ctl), remembered for ``cleanup``."""
        assert self.proc is not None
        found = []
        with contextlib.suppress(psutil.NoSuchProcess):
            found = psutil.Process(self.proc.pid).children(recursive=True)
        pid = self.postmaster_pid()
        if pid:
            with contextlib.suppress(psutil.NoSuchProcess):
                server = psutil.Process(pid)
                found += [server, *server.children(recursive=True)]
        for proc in found:
            self.seen.setdefault(proc.pid, proc)
        return found

    def runner(self) -> psutil.Process:
        """The runner agent child (the one alive now)."""
        assert self.proc is not None
        for child in psutil.Process(self.proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "runner" in child.cmdline() and "start" in child.cmdline():
                    self.seen.setdefault(child.pid, child)
                    return child
        raise AssertionError(f"conveyor up has no runner child:\n{self.log()[-3000:]}")

    def postmaster_pid(self) -> int:
        try:
            first = (self.data_dir / "postgres" / "postmaster.pid").read_text().split("\n")[0]
        except FileNotFoundError:
            return 0
        return int(first) if first.isdigit() else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    async def stop(self) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)

    async def cleanup(self) -> None:
        """SIGKILL whatever of the tree still runs, then unmount what its
        builds left mounted."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.remember()
                self.proc.kill()
            await self.proc.wait()
        left = [p for p in self.seen.values() if p.is_running()]
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        await asyncio.to_thread(psutil.wait_procs, left, 10)
        await asyncio.to_thread(unmount_under, self.tmp)


def gone_within(procs: list[psutil.Process], timeout: float) -> tuple[float, list[psutil.Process]]:
    """Wait until every process in ``procs`` has exited (zombies count as
    gone); return how long it took and those still alive at ``timeout``."""
    began = time.monotonic()
    alive = list(procs)
    while alive and time.monotonic() - began < timeout:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.02)
    return time.monotonic() - began, alive


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
