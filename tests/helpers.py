"""Test helpers: a control plane handle, a runner process, an async API
client, signed webhooks and git repositories."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio

from control.config import LifecycleSettings, RepositorySettings, Settings
from control.main import ControlPlane
from control.webhooks.github import signature
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import build_manager_pb2_grpc as bm_grpc
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc as cs_grpc
from conveyor.v1 import types_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parent.parent
FINAL = {
    pb.BUILD_STATUS_SUCCEEDED,
    pb.BUILD_STATUS_FAILED,
    pb.BUILD_STATUS_CANCELED,
    pb.BUILD_STATUS_TIMED_OUT,
    pb.BUILD_STATUS_ERRORED,
    pb.BUILD_STATUS_SUPERSEDED,
}
FAST_LIFECYCLE: dict[str, Any] = {
    "heartbeat_interval": 1.0,
    "runner_lost_after": 5.0,
    "alarm_poll": 0.2,
    "kill_grace": 2,
    "stop_confirm": 2.0,
}
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **GIT_ENV},
    )
    return out.stdout.strip()


def make_repo(path: Path, build_sh: str | None = None) -> Path:
    """A repository on branch main with build.sh; readable by the build user."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "build.sh").write_text(
        build_sh
        or 'echo "building $CONVEYOR_COMMIT_SHA"\nfor i in 1 2 3; do echo "line $i"; done\n'
    )
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "first")
    open_up(path)
    return path


def commit(repo: Path, filename: str, content: str, message: str = "change") -> str:
    (repo / filename).write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    open_up(repo)
    return git(repo, "rev-parse", "HEAD")


def open_up(path: Path) -> None:
    """Let the unprivileged build user read the repository (and reach it)."""
    subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def host_address() -> str | None:
    """This host's address on its default route, or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet leaves: UDP connect
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def outside_target() -> tuple[str, int] | None:
    """A host and port beyond this machine that it reaches now (PyPI's
    HTTPS), or None when it reaches none (no network here)."""
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return None
    return ("pypi.org", 443)


async def cli(control: ControlHandle, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """Run the `conveyor` command against ``control`` as its admin; return
    its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor_cli.main", *args,
        env={**os.environ, "CONVEYOR_ADDR": control.plane.grpc_address,
             "CONVEYOR_TOKEN": control.admin_token},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class ControlHandle:
    """A ControlPlane in this process with tokens and fast deadlines."""

    def __init__(self, database_url: str, **lifecycle: Any) -> None:
        self.admin_token = f"cvy_{secrets.token_urlsafe(16)}"
        self.runner_token = f"cvr_{secrets.token_urlsafe(16)}"
        self.secret_key = os.urandom(32)
        self.settings = Settings(
            database_url=database_url,
            grpc_addr="127.0.0.1:0",
            http_addr="127.0.0.1:0",
            admin_token=self.admin_token,
            runner_token=self.runner_token,
            scheduler_tick=0.5,
            lifecycle=LifecycleSettings(**{**FAST_LIFECYCLE, **lifecycle}),
            secret_keys=(self.secret_key,),
            # Tests build repositories in temp directories, as one user would.
            repositories=RepositorySettings(local="allow"),
        )
        self.plane = ControlPlane(self.settings)

    async def start(self) -> None:
        await self.plane.start()

    async def stop(self) -> None:
        await self.plane.stop()

    async def wait_runners(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with self.plane.db.connection() as conn:
                cur = await conn.execute("SELECT count(*) FROM runners WHERE connected")
                row = await cur.fetchone()
            if row and row[0] >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{count} runner(s) did not connect within {timeout} s")

    @property
    def http_url(self) -> str:
        return self.plane.http_url


class RunnerProcess:
    """``conveyor runner start`` as a real child process."""

    def __init__(self, control_addr: str, token: str, work_dir: Path, capacity: int = 4) -> None:
        self.control_addr = control_addr
        self.token = token
        self.work_dir = work_dir
        self.capacity = capacity
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = work_dir.parent / f"{work_dir.name}.log"

    async def start(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conveyor_cli.main", "runner", "start",
            "--control", self.control_addr, "--work-dir", str(self.work_dir),
            "--capacity", str(self.capacity), *extra,
            env={**os.environ, "CONVEYOR_RUNNER_TOKEN": self.token, **(env or {})},
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()

    def kill(self) -> None:
        """kill -9 the agent (its builds die with it: --die-with-parent)."""
        if self.proc is not None and self.proc.returncode is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Api:
    """Async gRPC client of the user-facing services."""

    def __init__(self, address: str, token: str, *, tls_ca: Path | None = None) -> None:
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
            self.channel = aio.secure_channel(address, creds)
        else:
            self.channel = aio.insecure_channel(address)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.config = cs_grpc.ConfigServiceStub(self.channel)
        self.builds = bm_grpc.BuildManagerStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    async def create_project(self, name: str, repo: Path | str, **fields: Any) -> pb.Project:
        fields.setdefault("build_command", "bash build.sh")
        fields.setdefault("deploy_command", "echo deployed")
        fields.setdefault("build_other_branches", True)
        reply = await self.config.CreateProject(
            cs.CreateProjectRequest(name=name, repo_url=str(repo), **fields),
            metadata=self.metadata,
        )
        return reply.project

    async def trigger(self, project: str, **fields: Any) -> pb.Build:
        reply = await self.config.TriggerBuild(
            cs.TriggerBuildRequest(project=project, **fields), metadata=self.metadata
        )
        return reply.build

    async def get(self, build_id: str) -> pb.Build:
        reply = await self.config.GetBuild(
            cs.GetBuildRequest(build_id=build_id), metadata=self.metadata
        )
        return reply.build

    async def cancel(self, build_id: str) -> pb.Build:
        reply = await self.builds.CancelBuild(
            bm.CancelBuildRequest(build_id=build_id), metadata=self.metadata
        )
        return reply.build

    async def wait_status(
        self, build_id: str, statuses: set[int] | None = None, timeout: float = 30
    ) -> pb.Build:
        wanted = statuses or FINAL
        deadline = time.monotonic() + timeout
        while True:
            build = await self.get(build_id)
            if build.status in wanted:
                return build
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"build {build_id} is {pb.BuildStatus.Name(build.status)} after {timeout} s"
                )
            await asyncio.sleep(0.02)

    async def logs(
        self, build_id: str, *, follow: bool = False, cursor: str = ""
    ) -> list[pb.LogLine]:
        lines: list[pb.LogLine] = []
        async for message in self.builds.StreamLogs(
            bm.StreamLogsRequest(build_id=build_id, follow=follow, cursor=cursor),
            metadata=self.metadata,
        ):
            lines.extend(message.lines)
        return lines


async def post_webhook(
    url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=io.BytesIO(body) if len(body) > 1 << 20 else body, headers=headers
        ) as response,
    ):
        text = await response.text()
        return response.status, json.loads(text) if text else {}


def github_push(branch: str, sha: str, message: str = "change") -> bytes:
    return json.dumps(
        {
            "ref": f"refs/heads/{branch}",
            "before": "0" * 40,
            "after": sha,
            "deleted": sha == "0" * 40,
            "head_commit": {"id": sha, "message": message},
            "repository": {"full_name": "acme/web"},
        }
    ).encode()


def github_headers(
    secret: str, body: bytes, event: str = "push", delivery: str = ""
) -> dict[str, str]:
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or secrets.token_hex(8),
        "X-Hub-Signature-256": signature(secret, body),
        "Content-Type": "application/json",
    }


class ProtocolRunner:
    """A runner client speaking the real runner protocol from the test, so a
    test controls every report and log batch (the real agent is used by the
    end-to-end tests)."""

    def __init__(self, address: str, token: str, capacity: int = 4, name: str = "proto") -> None:
        from conveyor.v1 import runner_service_pb2 as rs
        from conveyor.v1 import runner_service_pb2_grpc as rs_grpc

        self.rs = rs
        self.channel = aio.insecure_channel(address)
        self.stub = rs_grpc.RunnerServiceStub(self.channel)
        self.token = token
        self.capacity = capacity
        self.name = name
        self.runner_id = ""
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.assignments: asyncio.Queue[Any] = asyncio.Queue()
        self.cancels: asyncio.Queue[Any] = asyncio.Queue()
        self.registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.runner_uuid = str(uuid.uuid4())

    async def start(self) -> None:
        rs = self.rs
        self.outbox.put_nowait(
            rs.ConnectRequest(
                hello=rs.RunnerHello(
                    runner_id=self.runner_uuid, name=self.name, capacity=self.capacity
                )
            )
        )

        async def requests() -> Any:
            while True:
                yield await self.outbox.get()

        async def run() -> None:
            call = self.stub.Connect(
                requests(), metadata=(("authorization", f"Bearer {self.token}"),)
            )
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind == "registered":
                    self.runner_id = message.registered.runner_id
                    self.registered.set()
                elif kind == "assignment":
                    self.assignments.put_nowait(message.assignment)
                    self.outbox.put_nowait(
                        rs.ConnectRequest(
                            ack=rs.AssignmentAck(
                                build_id=message.assignment.build_id, accepted=True
                            )
                        )
                    )
                elif kind == "cancel":
                    self.cancels.put_nowait(message.cancel)

        self._task = asyncio.create_task(run())
        await asyncio.wait_for(self.registered.wait(), 10)

    def heartbeat(self, busy: int = 0) -> None:
        self.outbox.put_nowait(self.rs.ConnectRequest(heartbeat=self.rs.RunnerHeartbeat(busy=busy)))

    async def next_assignment(self, timeout: float = 10) -> Any:
        return await asyncio.wait_for(self.assignments.get(), timeout)

    async def report(self, assignment: Any, status: int = 0, **fields: Any) -> Any:
        return await self.stub.ReportStatus(
            self.rs.ReportStatusRequest(build_id=assignment.build_id, status=status, **fields),
            metadata=(("authorization", f"Bearer {assignment.build_token}"),),
        )

    async def append(
        self, assignment: Any, seq: int, texts: list[str], stream: int = pb.LOG_STREAM_STDOUT
    ) -> Any:
        now_ms = int(time.time() * 1000)
        return await self.stub.AppendLogs(
            self.rs.AppendLogsRequest(
                build_id=assignment.build_id,
                seq=seq,
                lines=[
                    self.rs.BatchLine(time_unix_ms=now_ms, stream=stream, text=t) for t in texts
                ],
            ),
            metadata=(("authorization", f"Bearer {assignment.build_token}"),),
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.channel.close(None)


@contextlib.contextmanager
def mounted_tmpfs(size: str, prefix: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``32m``) mounted on a new directory, unmounted
    and removed afterwards; skips the test where mounting is not allowed
    (it needs root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root): {exc}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()
