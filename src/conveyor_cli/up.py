"""`conveyor up`: the whole system on one machine, as one process tree.

Embedded PostgreSQL, every control-plane service, and one runner agent (a
child process, on the same code path as `conveyor runner start`). On a fresh
data directory it creates a demo project from a generated git repository and
runs a first build, printing its log.

One `up` per data directory (a lock). Its children are supervised
(``conveyor_cli.supervisor``): restarted when they die, gone when `up` dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry

from control.config import Settings
from control.main import ControlPlane
from control.secrets import new_key_text
from control.storage.embedded import EmbeddedPostgres, IncompatibleData
from control.storage.migrate import migration_files
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import build_manager_pb2_grpc as bm_grpc
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc as cs_grpc
from conveyor.v1 import types_pb2 as pb
from conveyor_cli.supervisor import PostgresSupervisor, RunnerSupervisor, SupervisorMetrics
from conveyor_cli.target import STATE_FILE

log = logging.getLogger(__name__)

DEMO_PROJECT = "demo"
DEMO_BUILD = "./build.sh"
DEMO_DEPLOY = 'echo "deploying $CONVEYOR_COMMIT_SHA of $CONVEYOR_PROJECT"'
# Held (flock) by the running `up` and by its PostgreSQL watchdog.
LOCK_FILE = "up.lock"
# How long a new `up` waits for what a dead one left to stop (s).
LOCK_WAIT_SECONDS = 60.0


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
    # ... and pass every folder above it (search only: o+x lets no one list
    # them), as the runner does for its work directory: a data directory
    # under a 0700 home would otherwise hide the demo from the build user.
    if os.geteuid() == 0:
        for parent in path.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
    return str(path)


class UpRefused(Exception):
    """Why ``up`` cannot start, as one sentence for the user."""


def _prepare_data_dir(data_dir: Path) -> tuple[Path, dict[str, str], int]:
    """Make and lock the data directory; return it, its state and the lock's
    file descriptor (the caller closes it last). Raises ``UpRefused``."""
    data_dir = data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        # Traversable but not listable: the build user reaches its own
        # workspace below; conveyor.json itself is 0600.
        data_dir.chmod(0o711)
        lock_fd = _lock(data_dir)
    except OSError as exc:
        raise UpRefused(_unusable(data_dir, exc)) from exc
    try:
        return data_dir, _load_or_create_state(data_dir), lock_fd
    except BaseException:
        os.close(lock_fd)
        raise


def _unusable(data_dir: Path, exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return f"the data directory {data_dir} is on a read-only filesystem; choose another"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"the data directory {data_dir} is not writable by this user"
    return f"cannot use the data directory {data_dir}: {exc.strerror or exc}"


def _lock(data_dir: Path) -> int:
    """Lock the data directory for this process and return the lock's file
    descriptor. The watchdog of the embedded PostgreSQL holds it too, so a
    successor waits while the server of an ``up`` that died is stopping.
    Raises ``UpRefused`` while another ``up`` lives, ``OSError``."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    waiting_since = 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        holder = _lock_holder(fd)
        if holder and psutil.pid_exists(holder):
            os.close(fd)
            raise UpRefused(
                f"another conveyor up (pid {holder}) is using the data directory {data_dir}"
            )
        if not waiting_since:
            waiting_since = time.monotonic()
            log.info("waiting for the PostgreSQL of a conveyor up that died to stop")
        elif time.monotonic() - waiting_since > LOCK_WAIT_SECONDS:
            os.close(fd)
            raise UpRefused(
                f"the data directory {data_dir} is still locked by what a conveyor up"
                f" that died (pid {holder}) left running; try again shortly"
            )
        time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lock_holder(fd: int) -> int:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


def _schema_number(version: str) -> int:
    head = version.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def _latest_schema() -> str:
    return migration_files()[-1][0]


def _check_schema(data_dir: Path, used: str) -> None:
    """Refuse a data directory whose database a newer Conveyor migrated:
    this one's code would misread it."""
    known = _latest_schema()
    if _schema_number(used) > _schema_number(known):
        raise UpRefused(
            f"the data directory {data_dir} was last used by a newer Conveyor (database schema"
            f" {used}; this one knows up to {known}); run that version or a newer one"
        )


def _check_port(port: int, what: str, flag: str) -> None:
    """Refuse a port something already listens on, before anything starts.
    (gRPC binds with SO_REUSEPORT and would share a port with another
    server instead of failing.)"""
    if port == 0:
        return
    with socket.socket() as sock:
        # Not refused for connections in TIME_WAIT, only for a listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UpRefused(
                    f"port {port} on 127.0.0.1 ({what}) is already in use; choose another"
                    f" with {flag}"
                ) from None
            raise UpRefused(f"cannot listen on 127.0.0.1:{port} ({what}): {exc.strerror}") from None


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
        _check_schema(data_dir, state.get("schema", ""))
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
    """Run until SIGINT or SIGTERM; return the exit code. A reason not to
    start is printed as one sentence on stderr (exit code 2)."""
    try:
        data_dir, state, lock_fd = await asyncio.to_thread(_prepare_data_dir, data_dir)
    except UpRefused as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        return await _run(
            data_dir, state, lock_fd, grpc_port, http_port,
            demo=demo, log_format=log_format, capacity=capacity, ready=ready,
        )  # fmt: skip
    except UpRefused as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        os.close(lock_fd)


async def _run(
    data_dir: Path,
    state: dict[str, str],
    lock_fd: int,
    grpc_port: int,
    http_port: int,
    *,
    demo: bool,
    log_format: str,
    capacity: int,
    ready: asyncio.Event | None,
) -> int:
    fresh = "grpc_address" not in state
    _check_port(grpc_port, "the gRPC port", "--grpc-port")
    _check_port(http_port, "the HTTP port", "--http-port")
    registry = CollectorRegistry()
    metrics = SupervisorMetrics(registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    database_url = os.environ.get("CONVEYOR_DATABASE_URL", "")
    pg: PostgresSupervisor | None = None
    plane: ControlPlane | None = None
    runner: RunnerSupervisor | None = None
    watchers: list[asyncio.Task[object]] = []
    try:
        if not database_url:
            server = EmbeddedPostgres(data_dir / "postgres")
            # The watchdog keeps the lock while it stops a server we left.
            pg = PostgresSupervisor(server, metrics, keep_fds=(lock_fd,))
            try:
                database_url = await pg.start()
            except IncompatibleData as exc:
                raise UpRefused(str(exc)) from None
        env = dict(os.environ)
        if pg is not None:
            # Log batches wait while the embedded server's disk is low,
            # before PostgreSQL runs out of space for its WAL.
            env.setdefault("CONVEYOR_DISK_PATH", str(data_dir / "postgres"))
        # One user's machine: projects may name local repositories, unless
        # the operator said otherwise (issue 15; ``control serve`` denies).
        env.setdefault("CONVEYOR_LOCAL_REPOSITORIES", "allow")
        if not env.get("CONVEYOR_SECRET_KEY") and not env.get("CONVEYOR_SECRET_KEY_FILE"):
            env["CONVEYOR_SECRET_KEY_FILE"] = str(
                await asyncio.to_thread(_secret_key_file, data_dir)
            )
        settings = Settings.from_env(env).with_(
            database_url=database_url,
            grpc_addr=f"127.0.0.1:{grpc_port}",
            http_addr=f"127.0.0.1:{http_port}",
            admin_token=state["token"],
            runner_token=state["runner_token"],
            log_format=log_format,
        )
        plane = ControlPlane(settings, registry=registry)
        try:
            await plane.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UpRefused(f"a port of Conveyor is already in use: {exc.strerror}") from None
            raise
        metrics_port = _free_port()
        state.update(
            grpc_address=plane.grpc_address,
            http_url=plane.http_url,
            runner_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            pid=str(os.getpid()),
            schema=_latest_schema(),
        )
        _write_state(data_dir, state)
        runner = RunnerSupervisor(
            [
                sys.executable, "-m", "conveyor_cli.main", "runner", "start",
                "--control", plane.grpc_address,
                "--work-dir", str(data_dir / "runner"),
                "--capacity", str(capacity),
                "--metrics-addr", f"127.0.0.1:{metrics_port}",
                "--log-format", log_format,
            ],
            {**os.environ, "CONVEYOR_RUNNER_TOKEN": state["runner_token"]},
            metrics,
        )  # fmt: skip
        await runner.start()
        print(
            f"Conveyor is up.\n"
            f"  gRPC     {plane.grpc_address}\n"
            f"  HTTP     {plane.http_url}  (/webhooks/github/<project>, /metrics, /healthz)\n"
            f"  dashboard: {plane.http_url}/  (sign in with {_token_hint(data_dir, state)})\n"
            f"  data     {data_dir}\n"
            f"  CLI      conveyor --data-dir {data_dir} builds list\n",
            flush=True,
        )
        if ready is not None:
            ready.set()
        if demo and fresh:
            watchers.append(asyncio.create_task(_demo(plane, data_dir, state["token"])))
        runner_watch = asyncio.create_task(runner.watch(), name="runner-supervisor")
        watchers.append(runner_watch)
        if pg is not None:
            watchers.append(asyncio.create_task(pg.watch(), name="postgres-supervisor"))
        waiter = asyncio.create_task(stop.wait())
        watchers.append(waiter)
        await asyncio.wait({waiter, runner_watch}, return_when=asyncio.FIRST_COMPLETED)
        # The runner supervisor returns only for an agent that refused its
        # configuration: restarting it would not help.
        return 1 if runner_watch.done() else 0
    finally:
        if plane is not None:
            log.info("stopping Conveyor")
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        if runner is not None:
            await runner.stop()
        if plane is not None:
            with contextlib.suppress(AttributeError):
                await plane.stop()
        if pg is not None:
            await pg.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _token_hint(data_dir: Path, state: dict[str, str]) -> str:
    """The admin token itself on a terminal (the person who started this),
    else where to read it: a token must not end up in a collected log."""
    if sys.stdout.isatty():
        return f"the token {state['token']}"
    return f'the "token" in {data_dir / STATE_FILE}'


async def _demo(plane: ControlPlane, data_dir: Path, token: str) -> None:
    """Create the demo project and follow its first build's log; say so
    when that fails (Conveyor itself stays up)."""
    from grpc import aio

    try:
        await _run_demo(plane, data_dir, token)
    except aio.AioRpcError as exc:
        print(f"demo: not run: {exc.details()}\n", flush=True)
        log.warning("demo not run: %s", exc.details())
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"demo: not run: could not create its repository: {exc}\n", flush=True)
        log.warning("demo not run: %s", exc)


async def _run_demo(plane: ControlPlane, data_dir: Path, token: str) -> None:
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
        print(
            f"demo: project {project.name!r} created; build {build.id} queued"
            f" (watch it live at {plane.http_url}/builds/{build.id})\n",
            flush=True,
        )
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
