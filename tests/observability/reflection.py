"""What `grpcurl list` and `grpcurl describe` see: server reflection."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def list_services(address: str) -> list[str]:
    """The services the server at ``address`` lists. Blocking: run it in a
    thread when the server shares this event loop."""
    with grpc.insecure_channel(address) as channel:
        return list(ProtoReflectionDescriptorDatabase(channel).get_services())


def describe(address: str, services: list[str]) -> dict[str, list[str]]:
    """Method names of each service, from descriptors fetched over
    reflection only (with every file they depend on)."""
    with grpc.insecure_channel(address) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        return {
            name: [method.name for method in pool.FindServiceByName(name).methods]
            for name in services
        }
