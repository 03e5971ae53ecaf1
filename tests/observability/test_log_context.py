"""Every log line written while handling a build carries its ids, without
the call sites passing them: the gRPC edge binds the caller's account and
the build a request names, and the runner binds its build task."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc import aio
from prometheus_client import CollectorRegistry

from control.api import edge
from control.api.edge import Authenticator, EdgeInterceptor
from control.errors import NotFound
from control.metrics import ControlMetrics
from conveyor.v1 import build_manager_pb2 as bm
from runner.build_run import BuildRun
from runner.control_client import ControlClient, assignment_from_pb
from runner.domain import BuildStatus
from runner.launchers.base import Limits
from runner.launchers.local import LocalLauncher
from runner.metrics import RunnerMetrics
from tests.helpers import Api, ControlHandle, ProtocolRunner
from tests.observability.capture import captured

probe_log = logging.getLogger("tests.probe")
PROBE = "/conveyor.v1.Probe/"


class ProbeServer:
    """A real gRPC server behind the real edge interceptor, serving test
    methods that log a line and then fail in chosen ways."""

    def __init__(self, control: ControlHandle) -> None:
        self.metrics = ControlMetrics(CollectorRegistry())
        self.server = aio.server(
            interceptors=[
                EdgeInterceptor(Authenticator(control.plane.accounts, "unused"), self.metrics)
            ]
        )

        async def crash(request: bm.CancelBuildRequest, context: Any) -> bm.CancelBuildResponse:
            probe_log.info("inside the handler")
            raise RuntimeError("boom")

        async def missing(request: bm.CancelBuildRequest, context: Any) -> bm.CancelBuildResponse:
            probe_log.info("inside the handler")
            raise NotFound("no such build")

        def handler(fn: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=bm.CancelBuildRequest.FromString,
                response_serializer=bm.CancelBuildResponse.SerializeToString,
            )

        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "conveyor.v1.Probe", {"Crash": handler(crash), "Missing": handler(missing)}
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def call(self, method: str, build_id: str, token: str) -> aio.AioRpcError:
        async with aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            rpc = channel.unary_unary(
                PROBE + method,
                request_serializer=bm.CancelBuildRequest.SerializeToString,
                response_deserializer=bm.CancelBuildResponse.FromString,
            )
            with pytest.raises(aio.AioRpcError) as err:
                await rpc(
                    bm.CancelBuildRequest(build_id=build_id),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
        return err.value


@pytest_asyncio.fixture
async def probe(
    control: ControlHandle, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ProbeServer]:
    monkeypatch.setitem(edge.ACCESS, PROBE + "Crash", "read")
    monkeypatch.setitem(edge.ACCESS, PROBE + "Missing", "read")
    server = ProbeServer(control)
    await server.server.start()
    try:
        yield server
    finally:
        await server.server.stop(None)


async def test_an_unexpected_failure_is_logged_once_with_the_build_and_account(
    control: ControlHandle, probe: ProbeServer
) -> None:
    build_id = str(uuid.uuid4())
    with captured("control", "tests.probe") as logs:
        err = await probe.call("Crash", build_id, control.admin_token)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error; it was logged"
    account = control.plane.admin_account_id
    inside = logs.where(message="inside the handler")
    assert len(inside) == 1
    assert (inside[0].get("build_id"), inside[0].get("account_id")) == (build_id, account)
    errors = logs.where(level="error")
    assert len(errors) == 1, errors
    assert errors[0]["message"] == f"unexpected failure in {PROBE}Crash"
    assert (errors[0].get("build_id"), errors[0].get("account_id")) == (build_id, account)
    assert "RuntimeError: boom" in errors[0]["error"]
    samples = probe.metrics.registry
    assert (
        samples.get_sample_value(
            "conveyor_grpc_requests_total", {"method": "Crash", "code": "INTERNAL"}
        )
        == 1
    )


async def test_expected_errors_are_not_logged_and_junk_ids_are_not_tagged(
    control: ControlHandle, probe: ProbeServer
) -> None:
    with captured("control", "tests.probe") as logs:
        err = await probe.call("Missing", "not-a-uuid\n{fake json}", control.admin_token)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no such build"
    assert logs.where(level="error") == []
    inside = logs.where(message="inside the handler")
    assert len(inside) == 1
    assert "build_id" not in inside[0]
    assert inside[0].get("account_id") == control.plane.admin_account_id


async def test_the_tags_of_one_rpc_do_not_leak_into_the_next(
    control: ControlHandle, probe: ProbeServer
) -> None:
    with captured("tests.probe") as logs:
        await probe.call("Missing", str(uuid.uuid4()), control.admin_token)
        await probe.call("Missing", "", control.admin_token)
        # None of it reached the test's own context either.
        probe_log.info("outside")
    first, second = logs.where(message="inside the handler")
    assert "build_id" in first
    assert "build_id" not in second
    assert "build_id" not in logs.where(message="outside")[0]


async def test_every_runner_line_inside_a_build_carries_its_ids(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, repo: Path, tmp_path: Path
) -> None:
    """The real BuildRun and local launcher, in this process so their records
    can be read at DEBUG; the protocol runner only takes the assignment."""
    project = await api.create_project("tagged", repo)
    build = await api.trigger("tagged")
    assignment = await proto_runner.next_assignment()
    assert assignment.build_id == build.id
    launcher = LocalLauncher(tmp_path / "workspaces")
    client = ControlClient(control.plane.grpc_address, control.runner_token)
    run = BuildRun(
        assignment_from_pb(assignment),
        client,
        launcher,
        RunnerMetrics(CollectorRegistry()),
        Limits(),
        True,
    )
    try:
        with captured("runner") as logs:
            status = await asyncio.create_task(run.run())
            logging.getLogger("runner.test").info("after the build, outside its task")
    finally:
        await launcher.close()
        await client.close()
    assert status == BuildStatus.SUCCEEDED
    inside = [ln for ln in logs.lines if ln["message"] != "after the build, outside its task"]
    # The launcher's own lines name no build; the context supplies it.
    assert any(ln["logger"].startswith("runner.launchers") for ln in inside), inside
    assert inside
    for line in inside:
        assert (line.get("build_id"), line.get("project_id")) == (build.id, project.id), line
    outside = logs.where(message="after the build, outside its task")
    assert "build_id" not in outside[0]
