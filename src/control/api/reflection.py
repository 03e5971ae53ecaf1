"""Server reflection under both names clients use, with the API's comments.

grpcio-reflection serves ``grpc.reflection.v1alpha`` only, and from the
generated modules, whose descriptors carry no comments. Newer clients
(grpcurl, Postman, buf curl) ask ``grpc.reflection.v1`` first: its messages
are the v1alpha ones field for field, so the same servicer answers both.
Files of ``conveyor.v1`` are answered from ``descriptors.binpb`` (written by
``scripts/gen-protos`` with source info), so a client sees each field's
documentation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (reflection.SERVICE_NAME, V1_SERVICE)


def documented_files() -> dict[str, bytes]:
    """Serialized FileDescriptorProtos of ``conveyor/v1/*.proto`` with their
    comments, by file name."""
    raw = (resources.files("conveyor.v1") / "descriptors.binpb").read_bytes()
    found = descriptor_pb2.FileDescriptorSet.FromString(raw)
    return {f.name: f.SerializeToString() for f in found.file if f.name.startswith("conveyor/")}


class DocumentedReflection(ReflectionServicer):  # type: ignore[misc]  # grpcio-reflection is untyped
    """The stock servicer, with our files swapped for their documented form."""

    def __init__(self, service_names: Iterable[str], files: dict[str, bytes]) -> None:
        super().__init__(tuple(service_names))
        self.files = files

    async def ServerReflectionInfo(
        self, request_iterator: Any, unused_context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for response in super().ServerReflectionInfo(request_iterator, unused_context):
            if response.HasField("file_descriptor_response"):
                protos = response.file_descriptor_response.file_descriptor_proto
                swapped = [self.files.get(_name(p), p) for p in protos]
                del protos[:]
                protos.extend(swapped)
            yield response


def _name(serialized: bytes) -> str:
    return descriptor_pb2.FileDescriptorProto.FromString(serialized).name


def enable(service_names: Iterable[str], server: aio.Server) -> None:
    """Serve reflection for ``service_names`` (plus both reflection services
    themselves) on ``server``, under v1 and v1alpha."""
    names = (*service_names, *SERVICE_NAMES)
    servicer = DocumentedReflection(names, documented_files())
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in SERVICE_NAMES:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )
