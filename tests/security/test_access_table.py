"""Every RPC with every kind of credential: who gets past the edge is what
the access table below says, written out here by hand so a change to
``control.api.edge.ACCESS`` has to change this table too. The scheduler's
RPCs take the control plane's own credential only: a tenant's admin token
cannot start builds past its account's limit, learn whether another
tenant's build exists, or list every account's queue."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import message_factory
from grpc import aio

from control.api.edge import ACCESS
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import runner_service_pb2 as rs
from conveyor.v1 import scheduler_service_pb2 as ss
from tests.helpers import Api, ControlHandle

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
SERVICES = [
    m.DESCRIPTOR.services_by_name[name]
    for m, name in (
        (cs, "ConfigService"),
        (bm, "BuildManager"),
        (ss, "SchedulerService"),
        (rs, "RunnerService"),
    )
]
CREDENTIALS = ("none", "unknown", "read", "write", "admin", "system", "runner", "build", "internal")
# Who passes each level: a user scope implies the ones below it; the control
# plane's own credential passes every level but a build's.
LEVELS = {
    "read": {"read", "write", "admin", "system", "internal"},
    "write": {"write", "admin", "system", "internal"},
    "admin": {"admin", "system", "internal"},
    "system": {"system", "internal"},
    "internal": {"internal"},
    "runner": {"runner", "internal"},
    "build": {"build"},
}
EXPECTED = {
    "ConfigService": {
        "CreateProject": "write",
        "GetProject": "read",
        "ListProjects": "read",
        "UpdateProject": "write",
        "DeleteProject": "write",
        "RotateWebhookSecret": "admin",
        "TriggerBuild": "write",
        "ListBuilds": "read",
        "GetBuild": "read",
        "RetryBuild": "write",
        "ListRunners": "read",
        "PurgeCache": "write",
        "SetEnvVar": "write",
        "UnsetEnvVar": "write",
        "ListEnvVars": "read",
        "CreateToken": "admin",
        "ListTokens": "admin",
        "RevokeToken": "admin",
        "ListAuditEvents": "admin",
        "CreateAccount": "system",
        "RotateSecrets": "system",
        "CreateDeployHook": "write",
        "ListDeployHooks": "read",
        "RevokeDeployHook": "write",
    },
    "BuildManager": {
        "StartBuild": "internal",
        "CancelBuild": "write",
        "StreamLogs": "read",
        "ReadLogs": "read",
    },
    "SchedulerService": {"Wake": "internal", "GetQueue": "read"},
    "RunnerService": {"Connect": "runner", "ReportStatus": "build", "AppendLogs": "build"},
}
# What the edge says when it turns a caller away; a handler's own refusal
# (the control plane's credential names no account) is past the edge.
EDGE_REFUSALS = (
    "missing or unknown token",
    "this call needs",
    "this call is for the control plane itself",
    "is not exposed",
)


def test_the_table_covers_every_rpc_and_matches_the_edge() -> None:
    methods = {f"/conveyor.v1.{s.name}/{m.name}" for s in SERVICES for m in s.methods}
    expected = {
        f"/conveyor.v1.{service}/{name}": level
        for service, rows in EXPECTED.items()
        for name, level in rows.items()
    }
    assert set(expected) == methods, "every RPC of every service is in the table"
    assert expected == ACCESS


@pytest_asyncio.fixture
async def tokens(control: ControlHandle, api: Api) -> AsyncIterator[dict[str, str]]:
    """A token of each kind, each of a tenant ("acme") but the bootstrap
    admin (system scope), the runner's and the control plane's own."""
    account = await api.config.CreateAccount(
        cs.CreateAccountRequest(name="acme"), metadata=api.metadata
    )
    tenant = Api(control.plane.grpc_address, account.admin_token)
    made = {"admin": account.admin_token}
    try:
        for scope in ("read", "write"):
            reply = await tenant.config.CreateToken(
                cs.CreateTokenRequest(name=scope, scopes=[scope]), metadata=tenant.metadata
            )
            made[scope] = reply.token
    finally:
        await tenant.close()
    yield {
        "none": "",
        "unknown": "cvy_no-such-token",
        **made,
        "system": control.admin_token,
        "runner": control.runner_token,
        "build": "cvb_not-a-live-build-token",
        "internal": control.plane.internal_token,
    }


async def call(channel: aio.Channel, service: Any, method: Any, token: str) -> tuple[Any, str]:
    """Call ``method`` with an empty request (one message for a client
    stream); return the status code and details."""
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/conveyor.v1.{service.name}/{method.name}"
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    kwargs: dict[str, Any] = {
        "request_serializer": request_cls.SerializeToString,
        "response_deserializer": response_cls.FromString,
    }
    try:
        if method.client_streaming:
            first = request_cls()
            if method.input_type.name == "ConnectRequest":
                # Not a hello: a runner that passed the edge is told so at once.
                first = rs.ConnectRequest(heartbeat=rs.RunnerHeartbeat())

            async def one() -> AsyncIterator[Any]:
                yield first

            stream = channel.stream_stream(path, **kwargs)(one(), metadata=metadata, timeout=10)
            async for _ in stream:
                pass
        elif method.server_streaming:
            async for _ in channel.unary_stream(path, **kwargs)(
                request_cls(), metadata=metadata, timeout=10
            ):
                pass
        else:
            await channel.unary_unary(path, **kwargs)(request_cls(), metadata=metadata, timeout=10)
    except aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def refused_at_the_edge(code: Any, details: str) -> bool:
    return code in (UNAUTHENTICATED, DENIED) and any(r in details for r in EDGE_REFUSALS)


async def test_every_rpc_with_every_credential(
    control: ControlHandle, tokens: dict[str, str]
) -> None:
    wrong: list[str] = []
    async with aio.insecure_channel(control.plane.grpc_address) as channel:
        for service in SERVICES:
            for method in service.methods:
                level = EXPECTED[service.name][method.name]
                for kind in CREDENTIALS:
                    code, details = await call(channel, service, method, tokens[kind])
                    allowed = kind in LEVELS[level]
                    if allowed == refused_at_the_edge(code, details):
                        wrong.append(f"{service.name}.{method.name} as {kind}: {code} {details}")
                    if not allowed and kind in ("none", "unknown"):
                        assert code == UNAUTHENTICATED, (method.name, kind, details)
    assert wrong == []


Probe = Callable[[Api, str], Any]


@pytest.mark.parametrize(
    ("label", "probe"),
    [
        (
            "start a build",
            lambda a, b: a.builds.StartBuild(bm.StartBuildRequest(build_id=b), metadata=a.metadata),
        ),
        (
            "start a batch",
            lambda a, b: a.builds.StartBuild(
                bm.StartBuildRequest(build_ids=[b]), metadata=a.metadata
            ),
        ),
        (
            "wake the scheduler",
            lambda a, b: a.channel.unary_unary(
                "/conveyor.v1.SchedulerService/Wake",
                request_serializer=ss.WakeRequest.SerializeToString,
                response_deserializer=ss.WakeResponse.FromString,
            )(ss.WakeRequest(), metadata=a.metadata),
        ),
    ],
)
async def test_an_admin_of_any_account_is_no_scheduler(
    control: ControlHandle, api: Api, repo: Any, label: str, probe: Probe
) -> None:
    """The bootstrap admin's build, then a tenant admin and the bootstrap
    admin itself: both are refused alike whatever the build's state, so the
    answer tells nothing about a build of another account."""
    await api.create_project("web", repo)
    build = await api.trigger("web", commit_sha="a" * 40)
    await api.cancel(build.id)
    account = await api.config.CreateAccount(
        cs.CreateAccountRequest(name="globex", concurrency_limit=1), metadata=api.metadata
    )
    tenant = Api(control.plane.grpc_address, account.admin_token)
    try:
        for client in (tenant, api):
            for build_id in (build.id, "00000000-0000-0000-0000-000000000000"):
                with pytest.raises(aio.AioRpcError) as err:
                    await probe(client, build_id)
                assert err.value.code() == DENIED, err.value.details()
                assert "control plane itself" in (err.value.details() or "")
    finally:
        await tenant.close()


async def test_the_queue_view_shows_the_callers_account_only(
    control: ControlHandle, api: Api, tokens: dict[str, str]
) -> None:
    def get_queue(token: str) -> Any:
        channel = aio.insecure_channel(control.plane.grpc_address)
        stub = channel.unary_unary(
            "/conveyor.v1.SchedulerService/GetQueue",
            request_serializer=ss.GetQueueRequest.SerializeToString,
            response_deserializer=ss.GetQueueResponse.FromString,
        )
        return channel, stub(ss.GetQueueRequest(), metadata=(("authorization", f"Bearer {token}"),))

    async with control.plane.db.connection() as conn:
        cur = await conn.execute("SELECT name, id::text FROM accounts")
        ids = dict(await cur.fetchall())
    seen = {}
    for kind in ("read", "admin", "system", "internal"):
        channel, pending = get_queue(tokens[kind])
        try:
            reply = await pending
        finally:
            await channel.close(None)
        seen[kind] = sorted(q.account_id for q in reply.accounts)
    assert seen["read"] == seen["admin"] == [ids["acme"]]
    assert seen["system"] == [ids["default"]]
    assert seen["internal"] == sorted(ids.values())
