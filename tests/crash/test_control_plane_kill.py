"""kill -9 of the control plane mid-build: it comes back on the same ports,
the runner reconnects, the build finishes, every log line arrives exactly
once, and the durable alarms still fire."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from conveyor.v1 import types_pb2 as pb
from tests.crash.processes import (
    NUMBERED,
    ControlProcess,
    db_value,
    numbered,
    wait_for_text,
    wait_until,
)
from tests.helpers import RunnerProcess, make_repo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RUNNER_LOST = 3.0


async def test_builds_survive_a_control_plane_killed_mid_build(
    database_url: str, tmp_path: Path
) -> None:
    control = ControlProcess(database_url, tmp_path / "control.log", runner_lost=RUNNER_LOST)
    await control.start()
    runner = RunnerProcess(control.grpc_address, control.runner_token, tmp_path / "runner", 2)
    await runner.start()
    api = control.api()
    try:
        repo = make_repo(tmp_path / "repo")
        await api.create_project("numbers", repo, build_command=NUMBERED.format(n=120))
        await api.create_project(
            "deadline", repo, build_command="echo waiting; sleep 60", run_timeout_seconds=3
        )
        build = await api.trigger("numbers")
        doomed = await api.trigger("deadline")
        await wait_for_text(api, build.id, "line 10")
        await wait_for_text(api, doomed.id, "waiting")
        await api.close()

        await control.kill()
        # The runner is frozen meanwhile (its builds go on: they live in
        # sessions of their own) and resumes only after the new control
        # plane's first reaper pass: down for longer than the runner-lost
        # bound, only the restart's grace keeps it and its builds from being
        # declared lost.
        assert runner.proc is not None
        os.killpg(runner.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(RUNNER_LOST + 0.5)
        stored = await db_value(
            database_url, "SELECT log_lines FROM builds WHERE id = %s", build.id
        )
        serving = await control.start()
        await asyncio.sleep(1.5)  # past the first reaper pass (every 1 s)
        back_at = await db_value(database_url, "SELECT now()")
        os.killpg(runner.proc.pid, signal.SIGCONT)
        reconnected = await wait_until(
            database_url, "SELECT bool_or(connected_at > %s) FROM runners", back_at
        )
        resumed = await wait_until(
            database_url, "SELECT log_lines > %s FROM builds WHERE id = %s", stored, build.id
        )
        print(
            f"\nmeasure: control-plane restart: serving {serving:.2f} s after the process"
            f" started; runner reconnected {reconnected:.2f} s and logs flowing"
            f" {reconnected + resumed:.2f} s after the runner could reach it"
        )

        api = control.api()
        done = await api.wait_status(build.id, timeout=30)
        assert done.status == pb.BUILD_STATUS_SUCCEEDED, done.status_reason
        lines = await api.logs(build.id)
        assert [ln.number for ln in lines] == list(range(1, len(lines) + 1))
        printed = [ln.text for ln in lines if ln.text.startswith("line ")]
        assert printed == numbered(120)

        # The run deadline armed before the kill fired after the restart.
        timed_out = await api.wait_status(doomed.id, timeout=30)
        assert timed_out.status == pb.BUILD_STATUS_TIMED_OUT, timed_out.status_reason
        assert timed_out.status_reason.startswith("run deadline")
        assert "waiting" in [ln.text for ln in await api.logs(doomed.id)]
    except BaseException:
        print(
            f"--- control plane log\n{control.log()[-6000:]}\n"
            f"--- runner log\n{runner.log()[-6000:]}"
        )
        raise
    finally:
        await api.close()
        await runner.stop()
        await control.stop()
