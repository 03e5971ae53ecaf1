"""`conveyor logs`: its exit status, a reader that goes away, and what
reaches a terminal. Real `conveyor` processes against a control plane on
port 0, the log written by a runner speaking the real protocol."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner, cli, git

ESC = "\x1b"
HOSTILE_LINES = [
    f"{ESC}[31mred text{ESC}[0m",
    f"clipboard {ESC}]52;c;cm0gLXJmIH4K{ESC}\\",
    f"title {ESC}]0;pwned\x07",
    f"link {ESC}]8;;https://evil.example/{ESC}\\click{ESC}]8;;{ESC}\\",
    f"ask {ESC}[6n and move {ESC}[3A{ESC}[2K",
    "c1 \u009b6n",
]


@pytest_asyncio.fixture
async def alive_runner(proto_runner: ProtocolRunner) -> AsyncIterator[ProtocolRunner]:
    """``proto_runner`` heartbeating, so its build is not declared lost
    while the test runs `conveyor` processes."""

    async def beat() -> None:
        while True:
            proto_runner.heartbeat(busy=1)
            await asyncio.sleep(0.5)

    task = asyncio.create_task(beat())
    try:
        yield proto_runner
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def running_build(api: Api, runner: ProtocolRunner, repo: Path, lines: list[str]) -> Any:
    """A running build of project "web" whose log holds ``lines``."""
    await api.create_project("web", repo)
    build = await api.trigger("web", commit_sha=git(repo, "rev-parse", "HEAD"))
    assignment = await runner.next_assignment()
    assert assignment.build_id == build.id
    await runner.report(assignment, pb.BUILD_STATUS_INITIALIZING)
    await runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    for start in range(0, len(lines), 5000):
        await runner.append(assignment, start // 5000 + 1, lines[start : start + 5000])
    return assignment


def _env(control: ControlHandle) -> dict[str, str]:
    return {
        **os.environ,
        "CONVEYOR_ADDR": control.plane.grpc_address,
        "CONVEYOR_TOKEN": control.admin_token,
    }


def _on_a_terminal(control: ControlHandle, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run `conveyor ARGS` with its stdout on a pseudo-terminal; return its
    exit status and everything it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor_cli.main", *args],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.DEVNULL, env=_env(control),
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(chunks).decode()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


async def test_exit_status_is_0_once_printed_and_the_build_outcome_when_asked(
    api: Api, control: ControlHandle, alive_runner: ProtocolRunner, repo: Path
) -> None:
    a = await running_build(api, alive_runner, repo, ["building", "error: tests failed"])
    prefix = a.build_id[:8]
    # Still running: printed (0); --exit-status says "not ended" (3).
    code, out, _ = await cli(control, "logs", prefix)
    assert (code, out) == (0, "building\nerror: tests failed\n")
    code, _, err = await cli(control, "logs", prefix, "--exit-status")
    assert code == 3
    assert "build running" in err

    await alive_runner.report(a, pb.BUILD_STATUS_FAILED, reason="exit_code=1 in step build")
    code, out, err = await cli(control, "logs", prefix)
    assert (code, out, err) == (0, "building\nerror: tests failed\n", "")
    code, out, err = await cli(control, "logs", prefix, "--exit-status")
    assert (code, err) == (1, "build failed\n")
    assert out == "building\nerror: tests failed\n"
    code, _, err = await cli(control, "logs", prefix, "--follow")
    assert (code, err) == (1, "build failed\n")


async def test_a_reader_that_goes_away_ends_the_command_quietly(
    api: Api, control: ControlHandle, alive_runner: ProtocolRunner, repo: Path
) -> None:
    # Far more than a pipe holds, so the writer meets the closed pipe.
    lines = [f"line {i:06d} " + "x" * 60 for i in range(20_000)]
    a = await running_build(api, alive_runner, repo, lines)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor_cli.main", "logs", a.build_id,
        env=_env(control), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert first.startswith(b"line 000000")
    # What `head -1` does: read a line, then close the pipe.
    proc._transport.get_pipe_transport(1).close()  # type: ignore[attr-defined]
    err = await asyncio.wait_for(proc.stderr.read(), 30)
    code = await asyncio.wait_for(proc.wait(), 30)
    assert err == b""
    assert code == 141  # 128 + SIGPIPE, as `cat` reports it


async def test_a_terminal_gets_colours_but_no_other_control_sequence(
    api: Api, control: ControlHandle, alive_runner: ProtocolRunner, repo: Path
) -> None:
    a = await running_build(api, alive_runner, repo, HOSTILE_LINES)
    code, shown = await asyncio.to_thread(_on_a_terminal, control, "logs", a.build_id)
    assert code == 0
    assert f"{ESC}[31mred text{ESC}[0m" in shown
    assert "clipboard ^[]52;c;cm0gLXJmIH4K^[\\" in shown
    assert "title ^[]0;pwned^G" in shown
    assert "ask ^[[6n and move ^[[3A^[[2K" in shown
    assert "c1 <U+009B>6n" in shown
    for bad in (f"{ESC}]", f"{ESC}[6n", f"{ESC}[3A", "\x07", "\u009b"):
        assert bad not in shown

    # --raw: the bytes as stored, even on a terminal.
    code, raw = await asyncio.to_thread(_on_a_terminal, control, "logs", a.build_id, "--raw")
    assert code == 0
    assert f"clipboard {ESC}]52;c;cm0gLXJmIH4K{ESC}\\" in raw
    # A pipe is not a terminal: as stored; --json escapes everything.
    code, piped, _ = await cli(control, "logs", a.build_id)
    assert piped == "\n".join(HOSTILE_LINES) + "\n"
    code, as_json, _ = await cli(control, "logs", a.build_id, "--json")
    assert ESC not in as_json
    assert "\\u001b]52" in as_json
