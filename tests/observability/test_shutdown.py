"""Graceful shutdown: live log viewers are told to resume elsewhere instead
of being cut off, other streams get the grace, and the pool is closed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from grpc import aio

from control.domain import cursor
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner
from tests.observability.capture import captured

GRACE = 2.0


async def test_stop_ends_a_live_follow_cleanly_within_the_grace_and_closes_the_pool(
    database_url: str, repo: Path
) -> None:
    handle = ControlHandle(database_url)
    handle.plane.shutdown_grace = GRACE
    await handle.start()
    runner = ProtocolRunner(handle.plane.grpc_address, handle.runner_token)
    api = Api(handle.plane.grpc_address, handle.admin_token)
    stopped = False
    try:
        await runner.start()
        await api.create_project("followed", repo)
        build = await api.trigger("followed")
        a = await runner.next_assignment()
        await runner.report(a, pb.BUILD_STATUS_INITIALIZING)
        await runner.report(a, pb.BUILD_STATUS_RUNNING)
        await runner.append(a, 1, ["one", "two"])

        received: list[bm.StreamLogsResponse] = []
        two_lines = asyncio.Event()

        async def follow() -> aio.AioRpcError | None:
            try:
                async for message in api.builds.StreamLogs(
                    bm.StreamLogsRequest(build_id=build.id, follow=True), metadata=api.metadata
                ):
                    received.append(message)
                    if sum(len(m.lines) for m in received) >= 2:
                        two_lines.set()
            except aio.AioRpcError as exc:
                return exc
            return None

        follower = asyncio.create_task(follow())
        await asyncio.wait_for(two_lines.wait(), 10)
        metrics = handle.plane.metrics.registry
        assert metrics.get_sample_value("conveyor_log_streams_active") == 1

        # The runner's Connect stream stays open: it is an in-flight call
        # that never ends by itself, so the stop waits the grace for it.
        began = time.monotonic()
        with captured("control") as logs:
            stopping = asyncio.create_task(handle.stop())
            stopped = True
            error = await asyncio.wait_for(follower, GRACE)
            ended_after = time.monotonic() - began
            await asyncio.wait_for(stopping, GRACE + 5)
        took = time.monotonic() - began

        assert error is not None, "the follow ended as if the build had finished"
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (error.details() or "")
        assert ended_after < GRACE, "the follow was not ended before the grace ran out"
        # Everything stored was delivered, and the last cursor resumes after it.
        lines = [ln.text for m in received for ln in m.lines]
        assert lines == ["one", "two"]
        assert cursor.decode(received[-1].cursor) == 2
        assert took < GRACE + 3
        assert handle.plane.db.pool.closed
        assert metrics.get_sample_value("conveyor_log_streams_active") == 0
        assert (
            metrics.get_sample_value(
                "conveyor_grpc_requests_total", {"method": "StreamLogs", "code": "UNAVAILABLE"}
            )
            == 1
        )
        # An orderly stop is not an incident: nothing logged at error level.
        assert logs.where(level="error") == []
        assert logs.where(message="control plane stopped")
    finally:
        await runner.close()
        await api.close()
        if not stopped:
            await handle.stop()
