"""kill -9 of a runner's whole process group mid-build: the build errors
"runner lost" within the bound and keeps the log the runner had sent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor.v1 import types_pb2 as pb
from tests.crash.processes import NUMBERED, unmount_under, wait_for_text
from tests.helpers import Api, ControlHandle, RunnerProcess, make_repo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

RUNNER_LOST = 3.0


@pytest.fixture
async def control(database_url: str) -> AsyncIterator[ControlHandle]:
    handle = ControlHandle(database_url, runner_lost_after=RUNNER_LOST)
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


async def test_a_killed_runner_s_build_errors_within_the_bound_with_its_log(
    control: ControlHandle, tmp_path: Path
) -> None:
    runner = RunnerProcess(control.plane.grpc_address, control.runner_token, tmp_path / "r", 2)
    await runner.start()
    api = Api(control.plane.grpc_address, control.admin_token)
    try:
        repo = make_repo(tmp_path / "repo")
        await api.create_project("killed", repo, build_command=NUMBERED.format(n=200))
        build = await api.trigger("killed")
        await wait_for_text(api, build.id, "line 5")
        runner.kill()
        killed_at = time.monotonic()
        sent = [ln.text for ln in await api.logs(build.id)]
        done = await api.wait_status(build.id, timeout=20)
        took = time.monotonic() - killed_at
        print(f"\nmeasure: lost runner detected {took:.2f} s after kill -9 (bound {RUNNER_LOST} s)")
        assert done.status == pb.BUILD_STATUS_ERRORED
        assert done.status_reason == "runner lost"
        # Silence bound + one heartbeat interval + one reaper poll.
        heartbeat = control.settings.lifecycle.heartbeat_interval
        assert took < RUNNER_LOST + heartbeat + 1.0, f"took {took:.2f} s"
        kept = [ln.text for ln in await api.logs(build.id)]
        assert kept[: len(sent)] == sent
        numbers = [t for t in kept if t.startswith("line ")]
        assert numbers == [f"line {i}" for i in range(1, len(numbers) + 1)]
        assert len(numbers) >= 5
    finally:
        await api.close()
        await runner.stop()
        unmount_under(tmp_path)
