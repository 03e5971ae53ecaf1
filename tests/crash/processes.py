"""The control plane as its own process on fixed ports, for tests that kill
it with SIGKILL and start it again where runners and clients look for it."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
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
