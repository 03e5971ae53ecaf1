"""SIGTERM drains the runner: its running build finishes, it takes no new
build, and it exits once idle; the waiting build goes to another runner."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.control.test_lifecycle import wait_for_line
from tests.helpers import FINAL, Api, ControlHandle, RunnerProcess


async def until_draining(api: Api, timeout: float = 10) -> None:
    """Wait until the control plane shows a draining runner: what the
    runner told it, rather than a guess at how long telling takes."""
    async with asyncio.timeout(timeout):
        while True:
            listed = await api.config.ListRunners(cs.ListRunnersRequest(), metadata=api.metadata)
            if any(r.draining for r in listed.runners):
                return
            await asyncio.sleep(0.02)


async def test_sigterm_lets_the_running_build_finish_and_takes_no_more(
    control: ControlHandle, api: Api, repo: Path, tmp_path: Path
) -> None:
    first = RunnerProcess(control.plane.grpc_address, control.runner_token, tmp_path / "r1", 2)
    await first.start()
    await control.wait_runners(1)
    try:
        await api.create_project("drain", repo, build_command="echo started; sleep 2; echo done")
        build = await api.trigger("drain")
        await wait_for_line(api, build.id, "started")
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)
        await until_draining(api)
        await api.create_project("waiting", repo, build_command="echo second")
        waiting = await api.trigger("waiting")
        # The draining runner said so at once: the waiting build is never
        # handed to it, not even while its slot is free before it exits.
        handed: set[str] = set()
        while (await api.get(build.id)).status not in FINAL or first.proc.returncode is None:
            handed.add((await api.get(waiting.id)).runner_id)
            if first.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert handed == {""}
        done = await api.wait_status(build.id, timeout=20)
        assert done.status == pb.BUILD_STATUS_SUCCEEDED
        assert "done" in [ln.text for ln in await api.logs(build.id)]
        assert await asyncio.wait_for(first.proc.wait(), 15) == 0
        assert (await api.get(waiting.id)).status == pb.BUILD_STATUS_QUEUED
        second = RunnerProcess(control.plane.grpc_address, control.runner_token, tmp_path / "r2", 1)
        await second.start()
        try:
            finished = await api.wait_status(waiting.id, timeout=20)
            assert finished.status == pb.BUILD_STATUS_SUCCEEDED
        finally:
            await second.stop()
    finally:
        await first.stop()
