"""A build read from storage carries what the lifecycle decides on: when
its runner was sent it, and the stop someone asked for."""

from __future__ import annotations

import asyncio
from pathlib import Path

from control.domain.build import BuildStatus, StopRequest
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner


async def test_a_read_build_carries_its_dispatch_and_its_stop_request(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    await api.create_project("rows", repo)
    build = await api.trigger("rows")
    assignment = await proto_runner.next_assignment()
    assert assignment.build_id == build.id
    store = control.plane.builds
    # The dispatch commits before the assignment goes out on the stream.
    sent = await store.get(None, build.id)
    assert sent.dispatched_at is not None
    assert (sent.cancel_requested_at, sent.stop_request) == (None, None)

    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    await api.cancel(build.id)
    cancel = await asyncio.wait_for(proto_runner.cancels.get(), 10)
    assert cancel.build_id == build.id
    asked = await store.get(None, build.id)
    assert asked.status == BuildStatus.RUNNING
    assert asked.cancel_requested_at is not None
    assert asked.stop_request == StopRequest(BuildStatus.CANCELED, "canceled by admin")

    # The runner's report of the stop ends the build in the state asked for.
    await proto_runner.report(assignment, pb.BUILD_STATUS_FAILED, reason="exit 143")
    done = await api.wait_status(build.id)
    assert (done.status, done.status_reason) == (pb.BUILD_STATUS_CANCELED, "canceled by admin")


async def test_a_build_no_runner_was_sent_reads_undispatched_and_cancels_at_once(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("idle", repo)
    build = await api.trigger("idle")
    queued = await control.plane.builds.get(None, build.id)
    assert (queued.status, queued.dispatched_at, queued.stop_request) == (
        BuildStatus.QUEUED,
        None,
        None,
    )
    canceled = await api.cancel(build.id)
    assert (canceled.status, canceled.status_reason) == (
        pb.BUILD_STATUS_CANCELED,
        "canceled by admin",
    )
    # Ended here at once: no stop was left for a runner to be sent.
    assert (await control.plane.builds.get(None, build.id)).stop_request is None
