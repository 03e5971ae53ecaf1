"""What a build's network reaches: with network, the world beyond the build
host but not the host's own services (its loopback, its own addresses);
without network (a project's `network_isolated`), nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from runner.launchers.local import own_network_tool
from runner.launchers.user_network import fence_tools
from tests.helpers import Api, RunnerProcess, host_address, outside_target


def reach(name: str, host: str, port: int) -> str:
    return f"if (exec 3<>/dev/tcp/{host}/{port}) 2>/dev/null; then echo network-{name}; fi;"


async def test_what_builds_with_and_without_network_reach(
    api: Api, runner: RunnerProcess, repo: Path
) -> None:
    outside, address = outside_target(), host_address()
    if outside is None or address is None:
        pytest.skip("needs a route beyond this host (PyPI) and an address besides loopback")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    on_address = await asyncio.start_server(serve, address, 0)
    on_loopback = await asyncio.start_server(serve, "127.0.0.1", 0)
    probe = (
        reach("outside-reached", *outside)
        + reach("host-reached", address, on_address.sockets[0].getsockname()[1])
        + reach("loopback-reached", "127.0.0.1", on_loopback.sockets[0].getsockname()[1])
        + " echo network-done"
    )
    try:
        await api.create_project("open", repo, build_command=probe)
        isolated = await api.create_project(
            "closed", repo, build_command=probe, network_isolated=True
        )
        assert isolated.network_isolated
        results = {}
        for name in ("open", "closed"):
            build = await api.trigger(name)
            done = await api.wait_status(build.id)
            assert done.status == pb.BUILD_STATUS_SUCCEEDED, done.status_reason
            results[name] = [
                ln.text for ln in await api.logs(build.id) if ln.text.startswith("network-")
            ]
        # With slirp4netns a build's network is its own (the host's loopback
        # out of reach); a root runner also fences the host's own addresses.
        own = own_network_tool() is not None
        fenced = own and fence_tools() != (None, None)
        open_sees = ["network-outside-reached"]
        open_sees += [] if fenced else ["network-host-reached"]
        open_sees += [] if own else ["network-loopback-reached"]
        assert results == {"open": [*open_sees, "network-done"], "closed": ["network-done"]}
        # And the setting can be turned off again.
        updated = await api.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="closed",
                values=pb.Project(network_isolated=False),
                update_mask=["network_isolated"],
            ),
            metadata=api.metadata,
        )
        assert not updated.project.network_isolated
    finally:
        for server in (on_address, on_loopback):
            server.close()
            await server.wait_closed()
