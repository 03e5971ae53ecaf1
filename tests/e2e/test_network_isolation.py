"""A project can run its builds without network: such a build cannot reach
a service elsewhere on the network, while a normal build can; neither
reaches the build host's loopback services."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from runner.launchers.local import own_network_tool
from tests.helpers import Api, RunnerProcess, host_address


async def test_network_isolated_projects_cannot_reach_the_host(
    api: Api, runner: RunnerProcess, repo: Path
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    address = host_address()
    if address is None:
        pytest.skip("this host has no address besides loopback")
    server = await asyncio.start_server(serve, address, 0)
    loopback = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    local_port = loopback.sockets[0].getsockname()[1]
    probe = (
        f"if (exec 3<>/dev/tcp/{address}/{port}) 2>/dev/null;"
        " then echo network-reached; else echo network-blocked; fi;"
        f" if (exec 3<>/dev/tcp/127.0.0.1/{local_port}) 2>/dev/null;"
        " then echo network-loopback-reached; fi"
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
        # With slirp4netns, a build's network is its own: the host's
        # loopback services are out of reach even with network on.
        open_sees = ["network-reached"] + (
            [] if own_network_tool() else ["network-loopback-reached"]
        )
        assert results == {"open": open_sees, "closed": ["network-blocked"]}
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
        for each in (server, loopback):
            each.close()
            await each.wait_closed()
