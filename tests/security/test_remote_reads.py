"""The control plane's ``git ls-remote`` on a tenant's URL (issue 15 item 4)
and local-path repositories (issue 14 item 2).

A manual trigger without a commit and every deploy-hook call read a branch
head on the control plane's host. These tests attack that read as a tenant
would: loopback and link-local URLs (an open-port oracle), this host's own
address, another tenant's local path, a root-only repository, and a silent
listener that never answers, once and a hundred times at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import grpc
import psutil
import pytest
from grpc import aio

from common.settings import ConfigError
from control.config import RepositorySettings
from control.errors import InvalidArgument, Unavailable
from control.forge.remote import IPAddress, RemoteReader
from control.main import ControlPlane
from conveyor.v1 import config_service_pb2 as cs
from tests.helpers import (
    Api,
    ControlHandle,
    git,
    github_headers,
    github_push,
    host_address,
    make_repo,
)

pytestmark = pytest.mark.timeout(60)


class Listener:
    """A TCP port on 127.0.0.1 that accepts and never answers; counts the
    connections it got."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._held: list[asyncio.StreamWriter] = []
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> Listener:
        async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._held.append(writer)
            async with self._changed:
                self.connections += 1
                self._changed.notify_all()

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def wait_connections(self, count: int) -> None:
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: self.connections >= count)

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for writer in self._held:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


def git_processes() -> list[psutil.Process]:
    """git (and setpriv) processes this test process started, still alive."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() in ("git", "setpriv", "git-remote-http") and child.status() != "zombie":
                found.append(child)
    return found


def open_reader(settings: RepositorySettings) -> RemoteReader:
    """A reader whose URL policy lets it reach 127.0.0.1, where these tests
    run their silent listener and git servers; everything else is as in
    production."""
    return RemoteReader(settings, blocked=(), own_addresses=set)


async def plane_with(database_url: str, repositories: RepositorySettings) -> ControlHandle:
    handle = ControlHandle(database_url)
    handle.settings = replace(handle.settings, repositories=repositories)
    handle.plane = ControlPlane(handle.settings)
    await handle.start()
    return handle


@pytest.fixture
async def shared(database_url: str) -> AsyncIterator[ControlHandle]:
    """A control plane as ``conveyor control serve`` starts by default:
    local repositories denied."""
    handle = await plane_with(database_url, RepositorySettings())
    try:
        yield handle
    finally:
        await handle.stop()


@pytest.fixture
async def shared_api(shared: ControlHandle) -> AsyncIterator[Api]:
    client = Api(shared.plane.grpc_address, shared.admin_token)
    try:
        yield client
    finally:
        await client.close()


async def error_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_the_local_repository_setting_is_read_from_the_environment() -> None:
    from control.config import Settings

    assert Settings.from_env({}).repositories.local == "deny"
    assert Settings.from_env({"CONVEYOR_LOCAL_REPOSITORIES": "allow"}).repositories.local_allowed
    for name, value in (
        ("CONVEYOR_LOCAL_REPOSITORIES", "yes"),
        ("CONVEYOR_LS_REMOTE_TIMEOUT_SECONDS", "0"),
        ("CONVEYOR_LS_REMOTE_CONCURRENCY", "0"),
        ("CONVEYOR_LS_REMOTE_PER_ACCOUNT", "many"),
    ):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({name: value})
        assert caught.value.name == name


@pytest.mark.parametrize(
    "url",
    ["{repo}", "file://{repo}", "/srv/other-tenant/app", "file:///srv/other-tenant/app"],
)
async def test_a_denying_control_plane_refuses_local_paths_at_creation(
    shared_api: Api, repo: Path, url: str
) -> None:
    code, details = await error_of(shared_api.create_project("web", url.format(repo=repo)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("repo_url: local repository paths are not allowed")
    assert "CONVEYOR_LOCAL_REPOSITORIES=deny" in details


async def test_a_denying_control_plane_reads_no_local_path_of_an_older_project(
    shared: ControlHandle, shared_api: Api, repo: Path
) -> None:
    """A project stored before the operator denied local paths: neither a
    trigger nor a deploy hook reads its path (the head of another tenant's
    repository, before the fix)."""
    project = await shared_api.create_project("web", "https://git.example.com/acme/web.git")
    async with shared.plane.db.connection() as conn:
        await conn.execute(
            "UPDATE projects SET repo_url = %s WHERE id = %s", (str(repo), project.id)
        )
    head = git(repo, "rev-parse", "HEAD")
    code, details = await error_of(shared_api.trigger("web"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("repo_url: local repository paths are not allowed")
    assert head not in details
    hook = await shared_api.config.CreateDeployHook(
        cs.CreateDeployHookRequest(project="web", name="deploy", branch="main"),
        metadata=shared_api.metadata,
    )
    async with aiohttp.ClientSession() as session, session.post(hook.url) as reply:
        assert reply.status == 502
        body = await reply.json()
    assert "local repository paths are not allowed" in body["error"]
    assert head not in str(body)


async def test_a_denying_control_plane_queues_no_build_of_an_older_local_project(
    shared: ControlHandle, shared_api: Api, repo: Path
) -> None:
    """A signed push and a trigger naming the commit never reach the runner
    (which would clone the path) for a project stored before the operator
    denied local paths; nothing is stored."""
    project = await shared_api.create_project("web", "https://git.example.com/acme/web.git")
    async with shared.plane.db.connection() as conn:
        await conn.execute(
            "UPDATE projects SET repo_url = %s WHERE id = %s", (str(repo), project.id)
        )
    head = git(repo, "rev-parse", "HEAD")
    body = github_push("main", head)
    url = f"{shared.http_url}/webhooks/github/{project.id}"
    async with aiohttp.ClientSession() as session:
        headers = github_headers(project.webhook_secret, body)
        async with session.post(url, data=body, headers=headers) as reply:
            assert reply.status == 422
            answer = await reply.json()
    assert answer["result"] == "refused"
    assert "CONVEYOR_LOCAL_REPOSITORIES=deny" in answer["error"]
    code, details = await error_of(shared_api.trigger("web", commit_sha=head))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "builds a local path" in details
    async with shared.plane.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM builds WHERE project_id = %s", (project.id,))
        assert await cur.fetchone() == (0,)


@pytest.mark.parametrize(
    "url",
    [
        "git://127.0.0.1:{port}/x",
        "http://localhost:{port}/x.git",
        "https://127.0.0.2:{port}/x.git",
        "ssh://git@127.0.0.1:{port}/x.git",
        "git@localhost:x.git",
        "git://[::1]:{port}/x",
        "http://[::ffff:127.0.0.1]:{port}/x",
        "git://0.0.0.0:{port}/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]:{port}/x",
        "git://224.0.0.1:{port}/x",
        "git://{host}:{port}/x",
    ],
)
async def test_the_url_policy_refuses_what_builds_cannot_reach(shared_api: Api, url: str) -> None:
    """Before the fix each of these was dialled by a root ``git ls-remote``:
    an answer told a closed port from an open one."""
    host = host_address()
    if "{host}" in url and host is None:
        pytest.skip("this host has no address besides loopback")
    async with Listener() as listener:
        url = url.format(port=listener.port, host=host)
        await shared_api.create_project("web", url)
        code, details = await error_of(shared_api.trigger("web"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details.startswith("repo_url: ")
        assert "an address builds cannot reach" in details
        assert listener.connections == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-only repository needs a root control plane")
async def test_a_root_only_repository_is_not_readable(
    control: ControlHandle, api: Api, tmp_path: Path
) -> None:
    """``conveyor up`` (local paths allowed) running as root: a repository
    only root may read is refused at creation with what to do, and a
    project that names it anyway never gets its head."""
    secret = make_repo(tmp_path / "root-only")
    secret.chmod(0o700)
    head = git(secret, "rev-parse", "HEAD")
    code, details = await error_of(api.create_project("web", secret))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"repo_url: builds cannot read {secret} as a git repository")
    assert f"chmod -R o+rX {secret}" in details
    assert "nobody (uid 65534)" in details
    project = await api.create_project("web", "https://git.example.com/acme/web.git")
    async with control.plane.db.connection() as conn:
        await conn.execute(
            "UPDATE projects SET repo_url = %s WHERE id = %s", (str(secret), project.id)
        )
    code, details = await error_of(api.trigger("web"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"repo_url: builds cannot read {secret}")
    assert head not in details
    # Opened to other users, but in a folder they cannot pass: still not
    # readable, as a root runner's build user could not reach it either.
    secret.chmod(0o755)
    os.chmod(tmp_path, 0o700)
    code, details = await error_of(api.create_project("web2", secret))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "o+x on every folder above it" in details
    os.chmod(tmp_path, 0o701)
    await api.create_project("web2", secret)
    build = await api.trigger("web2")
    assert build.commit_sha == head


async def test_a_local_path_not_on_this_host_is_accepted_and_named_at_trigger(
    api: Api,
) -> None:
    """Local paths allowed: a path this host cannot see may be on the
    runner's host; a trigger without a commit says so and names the field."""
    await api.create_project("web", "/srv/on-the-runner/web")
    code, details = await error_of(api.trigger("web"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "repo_url: /srv/on-the-runner/web does not exist on the control plane's host, so its"
        " head cannot be read here: give commit_sha"
    )
    build = await api.trigger("web", commit_sha="a" * 40)
    assert build.commit_sha == "a" * 40


@pytest.mark.timing(reason="a read of a silent listener ends at the 1 s timeout, not before")
async def test_a_silent_listener_times_out_and_leaves_no_process() -> None:
    reader = open_reader(RepositorySettings(timeout=1.0))
    async with Listener() as listener:
        began = time.monotonic()
        with pytest.raises(InvalidArgument) as caught:
            await reader.branch_head("acme", f"git://127.0.0.1:{listener.port}/x", "main")
        took = time.monotonic() - began
    assert str(caught.value) == "repo_url: the repository did not answer within 1 s"
    # The read reached the listener (git may connect once more before the
    # timeout ends it).
    assert listener.connections >= 1
    assert 0.9 <= took < 3.0
    assert git_processes() == []


@pytest.mark.timing(reason="every read ends within the 1 s timeout plus process start-up")
async def test_a_hundred_reads_of_a_silent_listener_hold_at_most_the_cap() -> None:
    """Issue 15: 100 deploy-hook calls on a silent listener held 100 git
    processes for 21 s. Now: at most ``per_account`` of one account and
    ``concurrency`` in all, every call answered within the timeout."""
    reader = open_reader(RepositorySettings(timeout=1.0, concurrency=3, per_account=2))
    most = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, len([p for p in git_processes() if p.name() == "git"]))
            await asyncio.sleep(0.02)

    async with Listener() as listener:
        url = f"git://127.0.0.1:{listener.port}/x"
        sampler = asyncio.create_task(sample())
        began = time.monotonic()
        results = await asyncio.gather(
            *(reader.branch_head(f"acct-{i % 2}", url, "main") for i in range(100)),
            return_exceptions=True,
        )
        took = time.monotonic() - began
        stop.set()
        await sampler
        timed_out = [r for r in results if isinstance(r, InvalidArgument)]
        busy = [r for r in results if isinstance(r, Unavailable)]
        assert len(timed_out) + len(busy) == 100, results
        # Two accounts of two slots each under a cap of three: three run,
        # a few more may start in the last moment before their own
        # deadline (when the first three end), the rest find no slot.
        assert 3 <= len(timed_out) <= 10
        # A read that started at its deadline may die before it dials.
        assert 3 <= listener.connections <= len(timed_out)
    assert 1 <= most <= 3
    assert took < 3.0
    assert "too many repository reads at once" in str(busy[0])
    assert git_processes() == []


async def test_one_account_cannot_take_every_slot() -> None:
    """An account at its cap waits; another account's read still runs."""
    reader = open_reader(RepositorySettings(timeout=3.0, concurrency=8, per_account=1))
    async with Listener() as listener:
        blocked = asyncio.create_task(
            reader.branch_head("greedy", f"git://127.0.0.1:{listener.port}/x", "main")
        )
        await listener.wait_connections(1)
        waiting = asyncio.create_task(
            reader.branch_head("greedy", f"git://127.0.0.1:{listener.port}/y", "main")
        )
        await asyncio.sleep(0.3)
        assert listener.connections == 1  # the second read of "greedy" waits
        other = asyncio.create_task(
            reader.branch_head("modest", f"git://127.0.0.1:{listener.port}/z", "main")
        )
        await listener.wait_connections(2)
        for task in (blocked, waiting, other):
            task.cancel()
        await asyncio.gather(blocked, waiting, other, return_exceptions=True)
    await asyncio.sleep(0)
    assert git_processes() == []


@pytest.fixture
def git_daemon(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """``git daemon`` serving a repository on 127.0.0.1; (port, its head)."""
    repo = make_repo(tmp_path / "served" / "app")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = subprocess.Popen(
        ["git", "daemon", "--export-all", f"--base-path={tmp_path / 'served'}",
         "--listen=127.0.0.1", f"--port={port}", "--reuseaddr", str(tmp_path / "served")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port, git(repo, "rev-parse", "HEAD")
    finally:
        daemon.terminate()
        daemon.wait(10)


async def test_git_connects_to_the_address_that_was_checked(
    git_daemon: tuple[int, str],
) -> None:
    """A name that resolves one way for the check and another way (or not
    at all) for git gains nothing: git dials the checked address."""
    port, head = git_daemon
    checked: list[str] = []

    async def resolve(host: str, _port: int) -> list[IPAddress]:
        checked.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    reader = RemoteReader(
        RepositorySettings(timeout=5.0), blocked=(), own_addresses=set, resolve=resolve
    )
    # repo.invalid resolves nowhere but in this reader's resolver.
    sha = await reader.branch_head("acme", f"git://repo.invalid:{port}/app", "main")
    assert sha == head
    assert checked == ["repo.invalid"]
    with pytest.raises(InvalidArgument) as caught:
        await reader.branch_head("acme", f"git://repo.invalid:{port}/app", "nope")
    assert str(caught.value) == "branch: branch 'nope' does not exist in the repository"
