"""The only runner module that talks gRPC to the control plane."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc import aio

from conveyor.v1 import runner_service_pb2 as rs
from conveyor.v1 import runner_service_pb2_grpc as rs_grpc

log = logging.getLogger(__name__)

# Codes after which the same request may succeed later.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
RPC_TIMEOUT = 15.0
# Longest pause between two tries of a refused RPC: bounds how long after
# the control plane (or its database) is back a runner resumes.
RETRY_CAP = 2.0


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, aio.AioRpcError) and exc.code() in RETRYABLE


class ControlClient:
    """A channel to the control plane. ``token`` is the runner token; build
    RPCs carry the build's own token."""

    def __init__(self, address: str, token: str, *, tls_ca: str = "") -> None:
        self.address = address
        self.token = token
        options = [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            # Reconnect quickly after a control-plane restart.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        if tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = aio.secure_channel(address, creds, options=options)
        else:
            self.channel = aio.insecure_channel(address, options=options)
        self.stub = rs_grpc.RunnerServiceStub(self.channel)

    def connect(
        self, requests: AsyncIterator[rs.ConnectRequest]
    ) -> AsyncIterator[rs.ConnectResponse]:
        """Open the runner stream; raises ``AioRpcError`` when it breaks.

        While the control plane is unreachable the call waits for the channel
        to connect (wait_for_ready) instead of failing at once, so a restarted
        control plane is reached as soon as the channel's reconnect sees it.
        """
        call = self.stub.Connect(
            requests,
            metadata=(("authorization", f"Bearer {self.token}"),),
            wait_for_ready=True,
        )
        return call.__aiter__()

    async def report(self, token: str, request: rs.ReportStatusRequest) -> rs.ReportStatusResponse:
        """Raises ``AioRpcError``; DEADLINE_EXCEEDED after ``RPC_TIMEOUT``
        seconds of waiting for an unreachable control plane (retryable)."""
        return await self.stub.ReportStatus(
            request,
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=RPC_TIMEOUT,
            wait_for_ready=True,
        )

    async def append(
        self, token: str, build_id: str, seq: int, packed: bytes, final: bool
    ) -> rs.AppendLogsResponse:
        """Send one log batch; raises ``AioRpcError`` as ``report`` does."""
        return await self.stub.AppendLogs(
            rs.AppendLogsRequest(build_id=build_id, seq=seq, packed=packed, final=final),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=RPC_TIMEOUT,
            wait_for_ready=True,
        )

    async def close(self) -> None:
        await self.channel.close(None)


async def backoff_sleep(attempt: int, base: float = 0.1, cap: float = RETRY_CAP) -> None:
    """Sleep an exponential backoff with full jitter; bounded by ``cap``."""
    import random

    await asyncio.sleep(random.uniform(0, min(cap, base * 2**attempt)))  # noqa: S311 (jitter)
