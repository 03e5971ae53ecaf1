"""gRPC health per service and server reflection, as grpcurl and an
orchestrator's gRPC check use them, through a graceful stop."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.main import SERVICE_NAMES
from conveyor.v1 import (
    build_manager_pb2,
    config_service_pb2,
    runner_service_pb2,
    scheduler_service_pb2,
)
from tests.helpers import ControlHandle
from tests.observability.reflection import describe, list_services

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GENERATED = {
    "conveyor.v1.ConfigService": config_service_pb2,
    "conveyor.v1.SchedulerService": scheduler_service_pb2,
    "conveyor.v1.BuildManager": build_manager_pb2,
    "conveyor.v1.RunnerService": runner_service_pb2,
}


async def test_reflection_lists_and_describes_every_service(control: ControlHandle) -> None:
    address = control.plane.grpc_address
    services = await asyncio.to_thread(list_services, address)
    assert set(services) == {
        *GENERATED,
        "grpc.health.v1.Health",
        # v1 for grpcurl and current clients, v1alpha for older ones.
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    # Descriptors come over the wire with their dependencies (types.proto...),
    # so `grpcurl describe` and `grpcurl ... Method` work without .proto files.
    methods = await asyncio.to_thread(describe, address, [*GENERATED, "grpc.health.v1.Health"])
    for name, module in GENERATED.items():
        short = name.rsplit(".", 1)[1]
        expected = [m.name for m in module.DESCRIPTOR.services_by_name[short].methods]
        assert methods[name] == expected, name
    assert {"Check", "Watch"} <= set(methods["grpc.health.v1.Health"])


async def test_health_is_serving_per_service_then_not_serving_then_gone(
    database_url: str,
) -> None:
    handle = ControlHandle(database_url)
    handle.plane.shutdown_grace = 2.0
    await handle.start()
    stopped = False
    channel = aio.insecure_channel(handle.plane.grpc_address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        assert set(SERVICE_NAMES) == set(GENERATED)
        for service in (*SERVICE_NAMES, ""):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == SERVING, service
        with pytest.raises(aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(service="conveyor.v1.Nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        # A watcher (an orchestrator or balancer) hears NOT_SERVING as soon
        # as the stop begins, while the process still answers.
        watch = health.Watch(health_pb2.HealthCheckRequest(service="conveyor.v1.BuildManager"))
        first = await asyncio.wait_for(watch.read(), 5)
        assert first.status == SERVING
        began = time.monotonic()
        stopping = asyncio.create_task(handle.stop())
        stopped = True
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == NOT_SERVING
        await asyncio.wait_for(stopping, 10)
        # The open Watch stream held the stop for the grace, no longer.
        assert time.monotonic() - began < handle.plane.shutdown_grace + 5
        with pytest.raises(aio.AioRpcError) as err:
            await watch.read()
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)

        with pytest.raises(aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close(None)
        if not stopped:
            await handle.stop()
