"""Server reflection answers under v1 and v1alpha, with the protos' comments."""

from __future__ import annotations

from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from tests.helpers import ControlHandle


async def ask(
    address: str, service: str, request: rpb.ServerReflectionRequest
) -> rpb.ServerReflectionResponse:
    async with aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString,
        )
        stream = call(iter([request]))
        async for response in stream:
            return response
    raise AssertionError("no reflection response")


async def test_v1_and_v1alpha_list_the_services(control: ControlHandle) -> None:
    for service in (
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ):
        reply = await ask(
            control.plane.grpc_address, service, rpb.ServerReflectionRequest(list_services="*")
        )
        names = {s.name for s in reply.list_services_response.service}
        assert {"conveyor.v1.ConfigService", "conveyor.v1.BuildManager"} <= names, service
        assert "grpc.reflection.v1.ServerReflection" in names


async def test_descriptors_carry_the_comments(control: ControlHandle) -> None:
    reply = await ask(
        control.plane.grpc_address,
        "grpc.reflection.v1.ServerReflection",
        rpb.ServerReflectionRequest(file_containing_symbol="conveyor.v1.ConfigService"),
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    config = next(f for f in files if f.name == "conveyor/v1/config_service.proto")
    comments = " ".join(
        loc.leading_comments for loc in config.source_code_info.location if loc.leading_comments
    )
    assert "ListRunners shows the build fleet" in comments
    assert "page_token is a previous response's next_page_token" in comments
