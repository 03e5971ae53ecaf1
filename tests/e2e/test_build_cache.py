"""The build cache end to end: a real control plane, a real runner agent
process with the local launcher and its default directory store, builds
of a real repository. The second build with the same lock file restores
what the first saved; `conveyor cache purge` empties it; a project can
turn it off; the runner's /metrics count it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, RunnerProcess, cli, commit

INSTALL = (
    'if [ -f deps/installed ]; then echo "deps from $(cat deps/installed)";'
    ' else mkdir -p deps && echo "$CONVEYOR_BUILD_ID" > deps/installed && echo installed; fi'
)


async def build_lines(api: Api, project: str) -> tuple[str, list[str], list[str]]:
    """Trigger a build; return its id, its output lines and its system lines."""
    build = await api.trigger(project)
    done = await api.wait_status(build.id, timeout=60)
    assert done.status == pb.BUILD_STATUS_SUCCEEDED, done.status_reason
    lines = await api.logs(build.id)
    out = [ln.text for ln in lines if ln.stream == pb.LOG_STREAM_STDOUT]
    system = [ln.text for ln in lines if ln.stream == pb.LOG_STREAM_SYSTEM]
    return build.id, out, system


def said(lines: list[str], text: str) -> bool:
    return any(text in line for line in lines)


async def test_the_second_build_restores_and_a_purge_empties_the_cache(
    api: Api, control: ControlHandle, runner: RunnerProcess, repo: Path
) -> None:
    commit(repo, "package-lock.json", '{"lockfileVersion": 3}\n')
    project = await api.create_project(
        "cached", repo, build_command=INSTALL, deploy_command="", cache_paths=["deps"]
    )
    assert project.cache_lockfiles  # the defaults, package-lock.json among them
    first, out, system = await build_lines(api, "cached")
    assert "installed" in out
    assert said(system, "cache saved: key")

    _, out, system = await build_lines(api, "cached")
    assert f"deps from {first}" in out
    assert said(system, "cache restored: key")

    code, purged, err = await cli(control, "cache", "purge", "cached")
    assert code == 0, err
    assert "generation 2" in purged
    _, out, system = await build_lines(api, "cached")
    assert "installed" in out
    assert said(system, "cache: nothing saved yet")

    # Off: no cache line at all, and nothing restored.
    await api.config.UpdateProject(
        cs.UpdateProjectRequest(
            project="cached",
            values=pb.Project(cache_disabled=True),
            update_mask=["cache_disabled"],
        ),
        metadata=api.metadata,
    )
    _id, out, system = await build_lines(api, "cached")
    assert "installed" in out
    assert not [line for line in system if "cache" in line]


async def test_the_runner_counts_restores_and_saves(
    api: Api, control: ControlHandle, tmp_path: Path, repo: Path
) -> None:
    runner = RunnerProcess(control.plane.grpc_address, control.runner_token, tmp_path / "r2")
    port = _free_port()
    await runner.start("--metrics-addr", f"127.0.0.1:{port}")
    try:
        await control.wait_runners(1)
        commit(repo, "requirements.txt", "six==1.16.0\n")
        await api.create_project(
            "counted", repo, build_command=INSTALL, deploy_command="", cache_paths=["deps"]
        )
        await build_lines(api, "counted")
        await build_lines(api, "counted")
        text = await _scrape(port)
        assert 'conveyor_runner_cache_saves_total{result="saved"} 1.0' in text
        assert 'conveyor_runner_cache_restores_total{result="exact"} 1.0' in text
        assert 'conveyor_runner_cache_restores_total{result="miss"} 1.0' in text
        assert (tmp_path / "r2" / "cache").is_dir()
    finally:
        await runner.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.decode()
