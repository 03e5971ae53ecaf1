"""`conveyor up`: the whole system on one machine, as one process tree.

Embedded PostgreSQL, every control-plane service, and one runner agent (a
child process, on the same code path as `conveyor runner start`). On a fresh
data directory it creates a demo project from a generated git repository and
runs a first build, printing its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

from control.config import Settings
from control.main import ControlPlane
from control.secrets import new_key_text
from control.storage.embedded import EmbeddedPostgres
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import build_manager_pb2_grpc as bm_grpc
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc as cs_grpc
from conveyor.v1 import types_pb2 as pb
from conveyor_cli.target import STATE_FILE

log = logging.getLogger(__name__)

DEMO_PROJECT = "demo"
DEMO_BUILD = "./build.sh"
DEMO_DEPLOY = 'echo "deploying $CONVEYOR_COMMIT_SHA of $CONVEYOR_PROJECT"'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_demo_repo(path: Path) -> str:
    """Create a small git repository with a build script; return its path."""
    if (path / ".git").exists():
        return str(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "build.sh").write_text(
        "#!/usr/bin/env bash\n"
        "set -euo pipefail\n"
        'echo "building $CONVEYOR_PROJECT at ${CONVEYOR_COMMIT_SHA:0:10} on $CONVEYOR_BRANCH"\n'
        'for i in 1 2 3 4 5; do echo "step $i of 5"; sleep 0.2; done\n'
        'echo "a line on stderr" >&2\n'
        "echo done\n"
    )
    (path / "build.sh").chmod(0o755)
    (path / "README.md").write_text("# demo\nA repository made by `conveyor up`.\n")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Conveyor",
        "GIT_AUTHOR_EMAIL": "demo@conveyor.invalid",
        "GIT_COMMITTER_NAME": "Conveyor",
        "GIT_COMMITTER_EMAIL": "demo@conveyor.invalid",
    }
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "demo"]):
        subprocess.run(["git", "-C", str(path), *args], check=True, env=env)
    # Builds run as an unprivileged user that must read the repository.
    for root, dirs, files in os.walk(path):
        for name in dirs:
            Path(root, name).chmod(0o755)
        for name in files:
            p = Path(root, name)
            p.chmod(p.stat().st_mode | 0o044)
    path.chmod(0o755)
    return str(path)


def _prepare_data_dir(data_dir: Path) -> tuple[Path, dict[str, str]]:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Traversable but not listable: the build user reaches its own
    # workspace below; conveyor.json itself is 0600.
    data_dir.chmod(0o711)
    return data_dir, _load_or_create_state(data_dir)


def _secret_key_file(data_dir: Path) -> Path:
    """The key that encrypts secrets at rest, made on first start (0600).
    Back it up with the database: secrets cannot be read without it."""
    path = data_dir / "secret.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(new_key_text() + "\n")
    return path


def _load_or_create_state(data_dir: Path) -> dict[str, str]:
    path = data_dir / STATE_FILE
    if path.exists():
        state: dict[str, str] = json.loads(path.read_text())
        return state
    return {
        "token": f"cvy_{secrets.token_urlsafe(32)}",
        "runner_token": f"cvr_{secrets.token_urlsafe(32)}",
    }


def _write_state(data_dir: Path, state: dict[str, str]) -> None:
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=2)
    tmp.replace(path)


async def run_up(
    data_dir: Path,
    grpc_port: int,
    http_port: int,
    *,
    demo: bool = True,
    log_format: str = "text",
    capacity: int = 6,
    ready: asyncio.Event | None = None,
) -> int:
    data_dir, state = await asyncio.to_thread(_prepare_data_dir, data_dir)
    fresh = "grpc_address" not in state

    database_url = os.environ.get("CONVEYOR_DATABASE_URL", "")
    pg: EmbeddedPostgres | None = None
    if not database_url:
        pg = EmbeddedPostgres(data_dir / "postgres")
        database_url = await asyncio.to_thread(pg.start)
    env = dict(os.environ)
    if not env.get("CONVEYOR_SECRET_KEY") and not env.get("CONVEYOR_SECRET_KEY_FILE"):
        env["CONVEYOR_SECRET_KEY_FILE"] = str(await asyncio.to_thread(_secret_key_file, data_dir))
    settings = Settings.from_env(env).with_(
        database_url=database_url,
        grpc_addr=f"127.0.0.1:{grpc_port}",
        http_addr=f"127.0.0.1:{http_port}",
        admin_token=state["token"],
        runner_token=state["runner_token"],
        log_format=log_format,
    )
    plane = ControlPlane(settings)
    runner: asyncio.subprocess.Process | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await plane.start()
        metrics_port = _free_port()
        state.update(
            grpc_address=plane.grpc_address,
            http_url=plane.http_url,
            runner_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            pid=str(os.getpid()),
        )
        _write_state(data_dir, state)
        runner = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conveyor_cli.main", "runner", "start",
            "--control", plane.grpc_address,
            "--work-dir", str(data_dir / "runner"),
            "--capacity", str(capacity),
            "--metrics-addr", f"127.0.0.1:{metrics_port}",
            "--log-format", log_format,
            env={**os.environ, "CONVEYOR_RUNNER_TOKEN": state["runner_token"]},
            # Its own session: a Ctrl-C reaches `up`, which drains the
            # runner before it stops the control plane.
            start_new_session=True,
        )  # fmt: skip
        print(
            f"Conveyor is up.\n"
            f"  gRPC     {plane.grpc_address}\n"
            f"  HTTP     {plane.http_url}  (/webhooks/github/<project>, /metrics, /healthz)\n"
            f"  data     {data_dir}\n"
            f"  CLI      conveyor --data-dir {data_dir} builds list\n",
            flush=True,
        )
        if ready is not None:
            ready.set()
        if demo and fresh:
            demo_task = asyncio.create_task(_demo(plane, data_dir, state["token"]))
        else:
            demo_task = None
        waiter = asyncio.create_task(stop.wait())
        runner_exit = asyncio.create_task(runner.wait())
        await asyncio.wait({waiter, runner_exit}, return_when=asyncio.FIRST_COMPLETED)
        if runner_exit.done():
            log.error("the runner agent exited with %s", runner.returncode)
        if demo_task is not None and not demo_task.done():
            demo_task.cancel()
        waiter.cancel()
        return 0 if not runner_exit.done() else 1
    finally:
        log.info("stopping Conveyor")
        if runner is not None and runner.returncode is None:
            runner.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(runner.wait(), 20)
            except TimeoutError:
                runner.kill()
                await runner.wait()
        with contextlib.suppress(AttributeError):
            await plane.stop()
        if pg is not None:
            await asyncio.to_thread(pg.stop)


async def _demo(plane: ControlPlane, data_dir: Path, token: str) -> None:
    """Create the demo project and follow its first build's log."""
    from grpc import aio

    repo = await asyncio.to_thread(make_demo_repo, data_dir / "demo-repo")
    metadata = (("authorization", f"Bearer {token}"),)
    async with aio.insecure_channel(plane.grpc_address) as channel:
        config = cs_grpc.ConfigServiceStub(channel)
        builds = bm_grpc.BuildManagerStub(channel)
        project = (
            await config.CreateProject(
                cs.CreateProjectRequest(
                    name=DEMO_PROJECT,
                    repo_url=repo,
                    production_branch="main",
                    build_command=DEMO_BUILD,
                    deploy_command=DEMO_DEPLOY,
                    build_other_branches=True,
                ),
                metadata=metadata,
            )
        ).project
        build = (
            await config.TriggerBuild(cs.TriggerBuildRequest(project=project.id), metadata=metadata)
        ).build
        print(f"demo: project {project.name!r} created; build {build.id} queued\n", flush=True)
        final: pb.BuildStatus.ValueType = pb.BUILD_STATUS_UNSPECIFIED
        async for message in builds.StreamLogs(
            bm.StreamLogsRequest(build_id=build.id, follow=True), metadata=metadata
        ):
            for line in message.lines:
                print(f"  │ {line.text}", flush=True)
            if message.status:
                final = message.status
        status = pb.BuildStatus.Name(final).removeprefix("BUILD_STATUS_").lower()
        print(
            f"\ndemo: build {build.id} {status}."
            f" Try: conveyor --data-dir {data_dir} builds show {build.id}\n",
            flush=True,
        )
