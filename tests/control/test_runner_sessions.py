"""A runner that reconnects supersedes its older stream: nothing is sent
into a stream that may be half-open."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.helpers import Api, ControlHandle, ProtocolRunner


async def test_a_reconnect_ends_the_older_stream_and_takes_its_assignments(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    old = ProtocolRunner(control.plane.grpc_address, control.runner_token, name="old")
    await old.start()
    new = ProtocolRunner(control.plane.grpc_address, control.runner_token, name="new")
    new.runner_uuid = old.runner_uuid
    try:
        await new.start()
        await api.create_project("sessions", repo)
        build = await api.trigger("sessions")
        assignment = await new.next_assignment()
        assert assignment.build_id == build.id
        assert old.assignments.empty()
        # The older stream was ended by the control plane.
        assert old._task is not None
        await asyncio.wait_for(asyncio.shield(old._task), 5)
    finally:
        await new.close()
        await old.close()
