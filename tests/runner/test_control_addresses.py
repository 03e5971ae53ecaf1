"""A runner given several control-plane addresses: the setting is checked
field by field, and the client calls whichever replica answers."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from runner import control_client
from runner.config import RunnerSettings
from runner.control_client import ControlClient, split_addresses
from runner.domain import Hello, Registered, RunnerMessage
from tests.crash.processes import free_port
from tests.helpers import ControlHandle

BASE = {"CONVEYOR_RUNNER_TOKEN": "t"}


def test_the_control_setting_takes_one_address_or_several() -> None:
    assert split_addresses("a.example:7070") == ("a.example:7070",)
    assert split_addresses(" 10.0.0.1:7070, [::1]:7071 ,b-2.internal:1") == (
        "10.0.0.1:7070",
        "[::1]:7071",
        "b-2.internal:1",
    )
    settings = RunnerSettings.from_env({**BASE, "CONVEYOR_CONTROL_ADDR": "a:1,b:2"})
    assert settings.control_addr == "a:1,b:2"
    assert RunnerSettings.from_env(BASE, control_addr="c:3").control_addr == "c:3"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("a.example", "'a.example' is not HOST:PORT"),
        ("a:1,b", "'b' is not HOST:PORT"),
        ("a:70000", "'a:70000' is not HOST:PORT"),
        ("::1:7070", "'::1:7070' is not HOST:PORT"),
        ("http://a:1", "'http://a:1' is not HOST:PORT"),
        ("a:1,a:1", "an address is listed twice"),
    ],
)
def test_a_bad_control_address_is_named(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match="CONVEYOR_CONTROL_ADDR") as refused:
        RunnerSettings.from_env({**BASE, "CONVEYOR_CONTROL_ADDR": value})
    assert str(refused.value) == f"CONVEYOR_CONTROL_ADDR (--control): {reason}"


async def test_runner_start_refuses_a_bad_address_in_one_sentence() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor_cli.main", "runner", "start",
        "--control", "127.0.0.1:7070,nowhere", "--token", "t",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert (
        err.decode()
        .strip()
        .endswith("error: CONVEYOR_CONTROL_ADDR (--control): 'nowhere' is not HOST:PORT")
    )


async def _hello() -> AsyncIterator[RunnerMessage]:
    yield Hello(
        runner_id=str(uuid.uuid4()), name="t", capacity=1, labels=(), launcher="local",
        sandbox="bubblewrap", version="test",
    )  # fmt: skip
    await asyncio.Event().wait()  # keep the stream open


async def test_the_client_moves_past_an_address_nobody_serves(control: ControlHandle) -> None:
    dead = f"127.0.0.1:{free_port()}"
    client = ControlClient([dead, control.plane.grpc_address], control.runner_token)
    try:
        began = time.monotonic()
        stream = client.connect(_hello())
        first = await asyncio.wait_for(anext(stream), 10)
        assert isinstance(first, Registered)
        assert client.address == control.plane.grpc_address
        # Far below the RPC deadline a wait_for_ready call on the dead
        # address would have spent.
        assert time.monotonic() - began < control_client.RPC_TIMEOUT / 3
        await stream.aclose()
    finally:
        await client.close()


async def test_with_no_replica_serving_a_call_is_unavailable_after_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(control_client, "PROBE_SECONDS", 0.3)
    client = ControlClient([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], "cvr_t")
    try:
        with pytest.raises(aio.AioRpcError) as refused:
            await asyncio.wait_for(
                client.append("token", str(uuid.uuid4()), 1, b"", final=False), 10
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert control_client.is_retryable(refused.value)
        assert "no control-plane replica answered within 0.3 s" in str(refused.value.details())
    finally:
        await client.close()


def test_the_addresses_may_come_from_a_file(tmp_path: Path) -> None:
    listed = tmp_path / "control"
    listed.write_text("10.0.0.1:7070\n10.0.0.2:7070\n")
    settings = RunnerSettings.from_env({**BASE, "CONVEYOR_CONTROL_ADDR_FILE": str(listed)})
    assert settings.control_addr_file == listed
    listed.write_text("10.0.0.1:7070\nnowhere\n")
    with pytest.raises(ValueError, match="nowhere") as refused:
        RunnerSettings.from_env({**BASE, "CONVEYOR_CONTROL_ADDR_FILE": str(listed)})
    assert str(refused.value) == (
        f"CONVEYOR_CONTROL_ADDR_FILE ({listed}): 'nowhere' is not HOST:PORT"
    )
    with pytest.raises(ValueError, match=r"CONVEYOR_CONTROL_ADDR_FILE .*No such file"):
        RunnerSettings.from_env({**BASE, "CONVEYOR_CONTROL_ADDR_FILE": str(tmp_path / "none")})
    listed.write_text("")
    with pytest.raises(ValueError, match="the control-plane address is required"):
        RunnerSettings.from_env({**BASE, "CONVEYOR_CONTROL_ADDR_FILE": str(listed)})


async def test_the_client_reads_the_file_again_when_its_replica_is_gone(
    control: ControlHandle, tmp_path: Path
) -> None:
    listed = tmp_path / "control"
    listed.write_text(f"127.0.0.1:{free_port()}\n")
    client = ControlClient("", control.runner_token, addresses_file=listed)
    try:
        # The replica it knew is gone; the template has since listed another.
        listed.write_text(f"{control.plane.grpc_address}\n")
        stream = client.connect(_hello())
        first = await asyncio.wait_for(anext(stream), 10)
        assert isinstance(first, Registered)
        assert client.addresses == (control.plane.grpc_address,)
        await stream.aclose()
    finally:
        await client.close()
