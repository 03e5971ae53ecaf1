"""A deadline's reason states the configured limit, and says so when the
deadline passed while the control plane could not act (issue 16: a 110 s
limit ended "run deadline of 134 s" after a database outage; a startup
deadline noticed late ended a build "startup deadline" with no word of it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from control.builds.deadlines import run_deadline_reason, startup_deadline_reason
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner, make_repo

OUTAGE = 30


async def test_a_deadline_that_passed_during_an_outage_states_the_limit_and_the_outage(
    control: ControlHandle,
    api: Api,
    proto_runner: ProtocolRunner,
    database_url: str,
    tmp_path: Path,
) -> None:
    project = await api.create_project(
        "late",
        make_repo(tmp_path / "repo"),
        run_timeout_seconds=110,
    )
    build = await api.trigger(project.id)
    assignment = await proto_runner.next_assignment()
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    # As if the build started 140 s ago and no replica could fire its
    # 110 s deadline for the last 30 s (the database was away).
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE builds SET started_at = now() - make_interval(secs => %s) WHERE id = %s",
            (110 + OUTAGE, build.id),
        )
        await conn.execute(
            "UPDATE alarms SET fire_at = now() - make_interval(secs => %s)"
            " WHERE build_id = %s AND kind = 'run'",
            (OUTAGE, build.id),
        )
    cancel = await asyncio.wait_for(proto_runner.cancels.get(), 10)
    expected = (
        "run deadline of 110 s (it passed while the control plane could not act,"
        f" and was noticed {OUTAGE} s late)"
    )
    assert (cancel.build_id, cancel.reason) == (build.id, expected)
    # The runner ends the job and reports with the reason it was given.
    await proto_runner.report(assignment, pb.BUILD_STATUS_TIMED_OUT, reason=cancel.reason)
    done = await api.wait_status(build.id)
    assert (done.status, done.status_reason) == (pb.BUILD_STATUS_TIMED_OUT, expected)


async def test_a_startup_deadline_that_passed_during_an_outage_says_so(
    control: ControlHandle,
    api: Api,
    proto_runner: ProtocolRunner,
    database_url: str,
    tmp_path: Path,
) -> None:
    project = await api.create_project("late-start", make_repo(tmp_path / "repo"))
    build = await api.trigger(project.id)
    # The runner holds the job and never reports it initializing.
    assignment = await proto_runner.next_assignment()
    # As if the 60 s startup deadline came 30 s ago and no replica could
    # fire it (the database was away).
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE alarms SET fire_at = now() - make_interval(secs => %s)"
            " WHERE build_id = %s AND kind = 'startup'",
            (OUTAGE, build.id),
        )
    expected = (
        "startup deadline of 60 s (it passed while the control plane could not act,"
        f" and was noticed {OUTAGE} s late)"
    )
    done = await api.wait_status(build.id)
    assert (done.status, done.status_reason) == (pb.BUILD_STATUS_ERRORED, expected)
    # The runner that held the job is told to stop it, with the same reason.
    cancel = await asyncio.wait_for(proto_runner.cancels.get(), 10)
    assert (cancel.build_id, cancel.reason) == (assignment.build_id, expected)


@pytest.mark.parametrize(
    ("limit", "late", "poll", "reason"),
    [
        (110, 0.3, 1.0, "run deadline of 110 s"),
        (110, 4.9, 1.0, "run deadline of 110 s"),
        (110, 24.0, 1.0, "run deadline of 110 s (it passed while the control plane could"
         " not act, and was noticed 24 s late)"),
        (60, 6.0, 0.2, "run deadline of 60 s (it passed while the control plane could"
         " not act, and was noticed 6 s late)"),
        (60, 9.0, 2.0, "run deadline of 60 s"),
    ],
)  # fmt: skip
def test_run_deadline_reasons(limit: int, late: float, poll: float, reason: str) -> None:
    assert run_deadline_reason(limit, late, poll) == reason


@pytest.mark.parametrize(
    ("limit", "late", "poll", "reason"),
    [
        (60.0, 0.3, 1.0, "startup deadline of 60 s"),
        (0.5, 0.1, 0.2, "startup deadline of 0.5 s"),
        (60.0, 30.2, 1.0, "startup deadline of 60 s (it passed while the control plane"
         " could not act, and was noticed 30 s late)"),
    ],
)  # fmt: skip
def test_startup_deadline_reasons(limit: float, late: float, poll: float, reason: str) -> None:
    assert startup_deadline_reason(limit, late, poll) == reason
