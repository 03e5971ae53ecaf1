"""A project can run its builds without network: such a build cannot reach
a port listening on the build host, while a normal build can."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, RunnerProcess


async def test_network_isolated_projects_cannot_reach_the_host(
    api: Api, runner: RunnerProcess, repo: Path
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    probe = (
        f"if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null;"
        " then echo network-reached; else echo network-blocked; fi"
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
        assert results == {"open": ["network-reached"], "closed": ["network-blocked"]}
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
        server.close()
        await server.wait_closed()
