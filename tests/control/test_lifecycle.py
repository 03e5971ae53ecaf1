"""The build lifecycle: transitions, cancel, retry, supersede, deadlines and
lost runners, with real runner processes where timing matters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from control.domain.build import FINAL_STATES, BuildStatus, check_transition, is_allowed
from control.errors import FailedPrecondition
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner, RunnerProcess


def test_every_final_state_is_final() -> None:
    for final in FINAL_STATES:
        for target in BuildStatus:
            assert not is_allowed(final, target)
        with pytest.raises(FailedPrecondition, match=f"build is {final.value}"):
            check_transition(final, BuildStatus.CANCELED)


@pytest.mark.parametrize(
    ("current", "target", "allowed"),
    [
        ("queued", "initializing", True),
        ("queued", "canceled", True),
        ("queued", "superseded", True),
        ("queued", "succeeded", False),
        ("initializing", "running", True),
        ("running", "succeeded", True),
        ("running", "timed_out", True),
        ("running", "queued", False),
        ("running", "superseded", False),
        ("initializing", "queued", False),
    ],
)
def test_transition_table(current: str, target: str, allowed: bool) -> None:
    assert is_allowed(BuildStatus(current), BuildStatus(target)) is allowed


async def test_cancel_of_a_queued_build_is_immediate(api: Api, repo: Path) -> None:
    await api.create_project("q", repo)
    build = await api.trigger("q")
    canceled = await api.cancel(build.id)
    assert canceled.status == pb.BUILD_STATUS_CANCELED
    assert canceled.status_reason == "canceled by admin"
    assert all(s.status == pb.STEP_STATUS_SKIPPED for s in canceled.steps)


async def test_illegal_moves_answer_failed_precondition_and_change_nothing(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    await api.create_project("illegal", repo)
    build = await api.trigger("illegal")
    a = await proto_runner.next_assignment()
    await proto_runner.report(a, pb.BUILD_STATUS_RUNNING)
    with pytest.raises(aio.AioRpcError) as err:
        await api.config.RetryBuild(cs.RetryBuildRequest(build_id=build.id), metadata=api.metadata)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "build is running" in (err.value.details() or "")
    await proto_runner.report(a, pb.BUILD_STATUS_SUCCEEDED)
    with pytest.raises(aio.AioRpcError) as err:
        await api.cancel(build.id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "build is succeeded" in (err.value.details() or "")
    with pytest.raises(aio.AioRpcError) as err:
        await proto_runner.report(a, pb.BUILD_STATUS_FAILED)
    assert (await api.get(build.id)).status == pb.BUILD_STATUS_SUCCEEDED


async def test_retry_builds_the_same_commit_linked_to_the_original(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    await api.create_project("retry", repo)
    build = await api.trigger("retry")
    a = await proto_runner.next_assignment()
    await proto_runner.report(a, pb.BUILD_STATUS_RUNNING)
    await proto_runner.report(a, pb.BUILD_STATUS_FAILED, reason="exit_code=1 in step build")
    reply = await api.config.RetryBuild(
        cs.RetryBuildRequest(build_id=build.id), metadata=api.metadata
    )
    retry = reply.build
    assert retry.id != build.id
    assert retry.retry_of == build.id
    assert (retry.commit_sha, retry.branch) == (build.commit_sha, build.branch)
    assert retry.trigger == "retry"


async def test_a_new_push_supersedes_the_branch_s_queued_builds(api: Api, repo: Path) -> None:
    await api.create_project("sup", repo)
    first = await api.trigger("sup")
    second = await api.trigger("sup")
    old = await api.get(first.id)
    assert old.status == pb.BUILD_STATUS_SUPERSEDED
    assert second.id in old.status_reason
    assert (await api.get(second.id)).status == pb.BUILD_STATUS_QUEUED


async def test_cancel_of_a_running_build_keeps_its_log(
    api: Api, runner: RunnerProcess, repo: Path
) -> None:
    await api.create_project("long", repo, build_command="echo started; sleep 60")
    build = await api.trigger("long")
    await wait_for_line(api, build.id, "started")
    began = time.monotonic()
    await api.cancel(build.id)
    done = await api.wait_status(build.id, timeout=10)
    took = time.monotonic() - began
    assert done.status == pb.BUILD_STATUS_CANCELED
    assert done.status_reason == "canceled by admin"
    assert took < 2.0, f"cancel took {took:.2f} s"
    texts = [ln.text for ln in await api.logs(done.id)]
    assert "started" in texts


async def test_cancel_of_a_build_that_ignores_sigterm_ends_after_the_grace(
    api: Api, runner: RunnerProcess, repo: Path
) -> None:
    await api.create_project(
        "stubborn",
        repo,
        build_command="trap 'echo ignoring TERM' TERM; echo started; "
        "while true; do sleep 0.1 || true; done",
    )
    build = await api.trigger("stubborn")
    await wait_for_line(api, build.id, "started")
    began = time.monotonic()
    await api.cancel(build.id)
    done = await api.wait_status(build.id, timeout=15)
    took = time.monotonic() - began
    assert done.status == pb.BUILD_STATUS_CANCELED
    # The test control plane's kill grace is 2 s.
    assert 1.8 <= took < 3.0 + 1.0, f"cancel took {took:.2f} s"
    assert "ignoring TERM" in [ln.text for ln in await api.logs(done.id)]


async def wait_for_line(api: Api, build_id: str, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in [ln.text for ln in await api.logs(build_id)]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in the log of {build_id}")


@pytest.fixture
async def strict_control(database_url: str) -> AsyncIterator[ControlHandle]:
    handle = ControlHandle(database_url, startup_deadline=1.0, runner_lost_after=3.0)
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


async def test_startup_deadline_errors_a_build_no_runner_started(
    strict_control: ControlHandle, repo: Path
) -> None:
    api = Api(strict_control.plane.grpc_address, strict_control.admin_token)
    silent = ProtocolRunner(strict_control.plane.grpc_address, strict_control.runner_token)
    await silent.start()
    try:
        await api.create_project("slow", repo)
        build = await api.trigger("slow")
        assignment = await silent.next_assignment()
        done = await api.wait_status(build.id, timeout=10)
        assert done.status == pb.BUILD_STATUS_ERRORED
        assert done.status_reason == "startup deadline of 1 s"
        stop = await asyncio.wait_for(silent.cancels.get(), 5)
        assert stop.build_id == assignment.build_id
    finally:
        await silent.close()
        await api.close()


async def test_run_deadline_times_the_build_out_with_its_partial_log(
    api: Api, runner: RunnerProcess, repo: Path
) -> None:
    await api.create_project(
        "deadline", repo, build_command="echo partial; sleep 60", run_timeout_seconds=1
    )
    build = await api.trigger("deadline")
    done = await api.wait_status(build.id, timeout=15)
    assert done.status == pb.BUILD_STATUS_TIMED_OUT
    assert done.status_reason.startswith("run deadline")
    assert "partial" in [ln.text for ln in await api.logs(done.id)]


async def test_a_silent_runner_is_declared_lost_and_its_build_errors(
    strict_control: ControlHandle, repo: Path
) -> None:
    api = Api(strict_control.plane.grpc_address, strict_control.admin_token)
    doomed = ProtocolRunner(strict_control.plane.grpc_address, strict_control.runner_token)
    await doomed.start()
    try:
        await api.create_project("lost", repo)
        build = await api.trigger("lost")
        a = await doomed.next_assignment()
        await doomed.report(a, pb.BUILD_STATUS_RUNNING)
        await doomed.append(a, 1, ["before the runner vanished"])
        began = time.monotonic()
        await doomed.close()  # no more heartbeats
        done = await api.wait_status(build.id, timeout=15)
        took = time.monotonic() - began
        assert done.status == pb.BUILD_STATUS_ERRORED
        assert done.status_reason == "runner lost"
        assert took < 3.0 + 2.0
        assert [ln.text for ln in await api.logs(build.id)] == ["before the runner vanished"]
    finally:
        await api.close()
