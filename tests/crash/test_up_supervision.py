"""`conveyor up` supervises its children (real process trees, kill -9):
a killed runner comes back with its identity and its builds end at once; a
second `up` on the data directory is refused; a killed postmaster is
restarted; and nothing outlives a killed `up`."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from conveyor.v1 import types_pb2 as pb
from runner.errors import WorkDirInUse
from runner.identity import ID_FILE, claim
from tests.crash.processes import NUMBERED, UpTree, gone_within, wait_for_text
from tests.helpers import FINAL, Api, make_repo
from tests.observability.scrape import scrape, scrape_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# The lost-runner timer of `up` (the default): a restarted runner must end
# its builds well before it.
RUNNER_LOST = 30.0


async def wait_final(api: Api, build_id: str, timeout: float) -> pb.Build:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        build = await api.get(build_id)
        if build.status in FINAL:
            return build
        await asyncio.sleep(0.05)
    raise AssertionError(f"build {build_id} did not end within {timeout} s")


async def test_a_killed_runner_is_restarted_and_nothing_outlives_a_killed_up(
    database_url: str, tmp_path: Path
) -> None:
    up = UpTree(tmp_path, database_url)
    try:
        state = await up.start()
        api = Api(state["grpc_address"], state["token"])
        try:
            repo = make_repo(tmp_path / "repo")
            await api.create_project("long", repo, build_command=NUMBERED.format(n=600))
            held = await api.trigger("long")
            await wait_for_text(api, held.id, "line 5")

            first = up.runner()
            runner_id = (up.data_dir / "runner" / ID_FILE).read_text().strip()
            first.kill()
            killed_at = time.monotonic()
            ended = await wait_final(api, held.id, RUNNER_LOST)
            ended_after = time.monotonic() - killed_at
            assert ended.status == pb.BUILD_STATUS_ERRORED, ended.status_reason
            assert ended.status_reason == "runner lost (restarted)"
            assert ended_after < RUNNER_LOST / 3, f"{ended_after:.1f} s"
            assert up.alive(), up.log()[-3000:]
            second = up.runner()
            assert second.pid != first.pid
            assert (up.data_dir / "runner" / ID_FILE).read_text().strip() == runner_id
            control = await scrape_until(
                state["http_url"] + "/metrics",
                lambda m: (
                    m.value("conveyor_runners_connected") == 1
                    and m.value("conveyor_up_child_restarts_total", child="runner") == 1
                ),
            )
            assert control.value("conveyor_runners_connected") == 1
            print(f"\nmeasure: runner killed -> its build ended in {ended_after:.2f} s")

            # A second `up` on the same data directory: one sentence, at once.
            began = time.monotonic()
            other = await asyncio.create_subprocess_exec(
                *up.argv(), env=up.env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(other.communicate(), 30)
            assert other.returncode == 2, (out, err)
            assert err.decode().strip() == (
                f"error: another conveyor up (pid {up.proc.pid}) is using the data directory"
                f" {up.data_dir.resolve()}"
            )
            assert time.monotonic() - began < 10

            # kill -9 of `up` itself, with a build running: the runner and
            # the build's processes go with it.
            busy = await api.trigger("long")
            await wait_for_text(api, busy.id, "line 5")
            tree = up.remember()
            assert len(tree) >= 3, tree  # the runner, the sandbox, the build
        finally:
            await api.close()
        up.proc.kill()
        took, left = await asyncio.to_thread(gone_within, tree, 15)
        assert not left, [p.pid for p in left]
        print(f"measure: up killed -> its {len(tree)} descendants gone in {took:.2f} s")
    finally:
        await up.cleanup()


@pytest.fixture
def own_dir() -> Iterator[Path]:
    """A directory outside pytest's base temp directory: another pytest
    session starting makes that base 0700, and a PostgreSQL running as its
    own user below it would lose its way to its socket lock file."""
    path = Path(tempfile.mkdtemp(prefix="conveyor-up-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_a_killed_postmaster_is_restarted_and_stopped_cleanly_with_a_killed_up(
    own_dir: Path,
) -> None:
    tmp_path = own_dir
    up = UpTree(tmp_path)  # its own embedded PostgreSQL
    try:
        state = await up.start()
        postmaster = psutil.Process(up.postmaster_pid())
        postmaster.kill()
        killed_at = time.monotonic()
        async with aiohttp.ClientSession() as session:
            while True:
                assert time.monotonic() - killed_at < 30, up.log()[-4000:]
                assert up.alive(), up.log()[-4000:]
                try:
                    async with session.get(state["http_url"] + "/readyz") as reply:
                        if reply.status == 200 and up.postmaster_pid() != postmaster.pid:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        back_after = time.monotonic() - killed_at
        metrics = await scrape(state["http_url"] + "/metrics")
        assert metrics.value("conveyor_up_child_restarts_total", child="postgres") == 1
        api = Api(state["grpc_address"], state["token"])
        try:
            # The control plane reconnected by itself: a write goes through.
            await api.create_project("after", make_repo(tmp_path / "repo"))
        finally:
            await api.close()
        print(f"\nmeasure: postmaster killed -> ready again in {back_after:.2f} s")

        tree = up.remember()
        server_log = up.data_dir / "postgres" / "server.log"
        logged = len(server_log.read_text())
        assert up.proc is not None
        up.proc.kill()
        took, left = await asyncio.to_thread(gone_within, tree, 45)
        assert not left, [(p.pid, p.cmdline()) for p in left]
        # A fast shutdown (checkpoint), not a crash that recovery must repair.
        assert "database system is shut down" in server_log.read_text()[logged:]
        print(f"measure: up killed -> PostgreSQL and the rest gone in {took:.2f} s")
    finally:
        await up.cleanup()


def test_one_runner_agent_per_work_directory_with_a_kept_id(tmp_path: Path) -> None:
    first = claim(tmp_path / "work")
    try:
        with pytest.raises(WorkDirInUse):
            claim(tmp_path / "work")
    finally:
        first.release()
    again = claim(tmp_path / "work")
    again.release()
    assert again.runner_id == first.runner_id
