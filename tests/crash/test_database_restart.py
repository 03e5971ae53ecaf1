"""PostgreSQL restarted mid-build (on a server of the test's own: the
session's server is shared): the control plane and the runner reconnect,
the build finishes, and no log line is lost or stored twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.storage.embedded import EmbeddedPostgres
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


@pytest.fixture
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("own-pg") / "data")
    server.start()
    server.keep_port()
    try:
        yield server
    finally:
        server.stop()


async def test_a_build_survives_a_database_crash_and_restart(
    own_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    url = own_postgres.url
    control = ControlProcess(url, tmp_path / "control.log", runner_lost=RUNNER_LOST)
    await control.start()
    runner = RunnerProcess(control.grpc_address, control.runner_token, tmp_path / "runner", 2)
    await runner.start()
    api = control.api()
    try:
        repo = make_repo(tmp_path / "repo")
        await api.create_project("numbers", repo, build_command=NUMBERED.format(n=120))
        build = await api.trigger("numbers")
        await wait_for_text(api, build.id, "line 10")

        # "immediate": no checkpoint, sessions cut; recovery runs at start.
        await asyncio.to_thread(own_postgres.stop, "immediate")
        # Down for longer than the runner-lost bound: heartbeats cannot land
        # meanwhile, and that must not pass for the loss of the runner.
        await asyncio.sleep(RUNNER_LOST + 0.5)
        began = time.monotonic()
        await asyncio.to_thread(own_postgres.start)
        assert own_postgres.url == url
        up = time.monotonic() - began
        stored = await db_value(url, "SELECT log_lines FROM builds WHERE id = %s", build.id)
        resumed = await wait_until(
            url, "SELECT log_lines > %s FROM builds WHERE id = %s", stored, build.id
        )
        print(
            f"\nmeasure: database restart: up after {up:.2f} s, logs flowing {resumed:.2f} s later"
        )

        done = await api.wait_status(build.id, timeout=40)
        assert done.status == pb.BUILD_STATUS_SUCCEEDED, done.status_reason
        lines = await api.logs(build.id)
        assert [ln.number for ln in lines] == list(range(1, len(lines) + 1))
        assert [ln.text for ln in lines if ln.text.startswith("line ")] == numbered(120)
        # The services are whole again: a new build runs end to end.
        await api.create_project("again", repo, build_command="echo again")
        again = await api.trigger("again")
        after = await api.wait_status(again.id, timeout=40)
        assert after.status == pb.BUILD_STATUS_SUCCEEDED, (
            after.status_reason,
            [ln.text for ln in await api.logs(again.id)][-20:],
        )
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
