"""PostgreSQL stopped and started again under traffic (a server of the
test's own): webhooks answer 503 with Retry-After at once, gRPC answers
UNAVAILABLE within the call's deadline, and both resume by themselves."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from control.storage.embedded import EmbeddedPostgres
from conveyor.v1 import config_service_pb2 as cs
from tests.crash.processes import ControlProcess
from tests.helpers import git, github_headers, github_push, make_repo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# The deadline of every gRPC call, and the longest a webhook may take (s).
DEADLINE = 2.0
OUTAGE = 4.0


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    # Outside pytest's base temp directory, which another pytest session
    # starting makes 0700 (the server runs as its own user when root).
    base = Path(tempfile.mkdtemp(prefix="conveyor-outage-"))
    server = EmbeddedPostgres(base / "data")
    server.start()
    server.keep_port()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def in_own_process(server: EmbeddedPostgres, call: str) -> None:
    """Run ``server.<call>`` in a fresh Python process: pg_ctl runs as the
    server's user, and forking for that from this process, whose gRPC
    threads are busy with the test's traffic, now and then killed the child
    with SIGSEGV before it could exec."""
    code = (
        "from pathlib import Path\n"
        "from control.storage.embedded import EmbeddedPostgres\n"
        f"EmbeddedPostgres(Path({str(server.data_dir)!r}), port={server.port}).{call}\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await asyncio.wait_for(proc.wait(), 90) == 0, f"{call} failed"


@dataclass(frozen=True)
class Sample:
    at: float
    took: float
    outcome: str  # "202", "503 retry-after=5", "OK", "UNAVAILABLE", ...


class Traffic:
    """Webhooks and gRPC calls, one after another on each side, recorded."""

    def __init__(self, control: ControlProcess, hook_url: str, secret: str, sha: str) -> None:
        self.control = control
        self.hook_url = hook_url
        self.secret = secret
        self.sha = sha
        self.hooks: list[Sample] = []
        self.calls: list[Sample] = []
        self.stopping = False

    async def webhooks(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self.stopping:
                # A branch of its own per push: the same push twice is a
                # replay, answered 200 with the first build.
                body = github_push(f"load-{len(self.hooks)}", self.sha)
                began = time.monotonic()
                async with session.post(
                    self.hook_url, data=body, headers=github_headers(self.secret, body)
                ) as reply:
                    await reply.read()
                    outcome = str(reply.status)
                    if reply.status == 503:
                        outcome += f" retry-after={reply.headers.get('Retry-After')}"
                self.hooks.append(Sample(began, time.monotonic() - began, outcome))
                await asyncio.sleep(0.05)

    async def grpc_calls(self, project_id: str) -> None:
        api = self.control.api()
        try:
            while not self.stopping:
                began = time.monotonic()
                try:
                    await api.config.GetProject(
                        cs.GetProjectRequest(project=project_id),
                        metadata=api.metadata,
                        timeout=DEADLINE,
                    )
                    outcome = "OK"
                except grpc.aio.AioRpcError as exc:
                    outcome = exc.code().name
                self.calls.append(Sample(began, time.monotonic() - began, outcome))
                await asyncio.sleep(0.05)
        finally:
            await api.close()


def between(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.at and s.at + s.took <= end]


async def test_webhooks_and_grpc_fail_fast_while_the_database_is_away_and_resume(
    own_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    control = ControlProcess(own_postgres.url, tmp_path / "control.log")
    await control.start()
    api = control.api()
    tasks: list[asyncio.Task[None]] = []
    try:
        repo = make_repo(tmp_path / "repo")
        project = await api.create_project("outage", repo)
        sha = git(repo, "rev-parse", "HEAD")
        hook_url = f"http://127.0.0.1:{control.http_port}/webhooks/github/{project.id}"
        traffic = Traffic(control, hook_url, project.webhook_secret, sha)
        tasks = [
            asyncio.create_task(traffic.webhooks()),
            asyncio.create_task(traffic.grpc_calls(project.id)),
        ]
        await asyncio.sleep(1.0)
        assert {s.outcome for s in traffic.hooks} == {"202"}, traffic.hooks
        assert {s.outcome for s in traffic.calls} == {"OK"}, traffic.calls

        await in_own_process(own_postgres, 'stop("immediate")')
        down_at = time.monotonic()
        await asyncio.sleep(OUTAGE)
        # The server answers before the process that started it has exited:
        # the outage ends at the start, recovery is counted from the end.
        restart_at = time.monotonic()
        await in_own_process(own_postgres, "start()")
        up_at = time.monotonic()

        # Wait until both sides answer again, with samples begun after the start.
        while time.monotonic() - up_at < 30:
            hooks_back = [s for s in traffic.hooks if s.at > up_at and s.outcome == "202"]
            calls_back = [s for s in traffic.calls if s.at > up_at and s.outcome == "OK"]
            if hooks_back and calls_back:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no recovery: {traffic.hooks[-5:]} {traffic.calls[-5:]}")
        traffic.stopping = True
        await asyncio.gather(*tasks)

        # While it was away (give the first moment to calls already under way).
        hooks = between(traffic.hooks, down_at + 0.5, restart_at)
        calls = between(traffic.calls, down_at + 0.5, restart_at)
        assert len(hooks) >= 3, traffic.hooks
        assert len(calls) >= 3, traffic.calls
        assert {s.outcome for s in hooks} == {"503 retry-after=5"}, hooks
        assert {s.outcome for s in calls} == {"UNAVAILABLE"}, calls
        slowest_hook = max(s.took for s in hooks)
        slowest_call = max(s.took for s in calls)
        assert slowest_hook < DEADLINE, hooks
        assert slowest_call < DEADLINE, calls
        # Nothing but those answers at any time, and nothing slower than the
        # deadline either.
        everything = traffic.hooks + traffic.calls
        assert {s.outcome for s in everything} <= {"202", "503 retry-after=5", "OK", "UNAVAILABLE"}
        resumed = max(hooks_back[0].at + hooks_back[0].took, calls_back[0].at + calls_back[0].took)
        print(
            f"\nmeasure: database away {restart_at - down_at:.1f} s: {len(hooks)} webhooks 503"
            f" (slowest {slowest_hook:.2f} s), {len(calls)} calls UNAVAILABLE (slowest"
            f" {slowest_call:.2f} s); both answering again {resumed - up_at:.2f} s after restart"
        )
    except BaseException:
        print(f"--- control plane log\n{control.log()[-6000:]}")
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await api.close()
        await control.stop()
