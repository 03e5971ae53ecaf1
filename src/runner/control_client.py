"""The only runner module that talks gRPC to the control plane."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

from common.retry import RetryPolicy
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
# With several control-plane addresses: how long one search for a reachable
# one waits before the caller gets UNAVAILABLE (and retries with backoff).
PROBE_SECONDS = 5.0

_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})")


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, aio.AioRpcError) and exc.code() in RETRYABLE


def split_addresses(text: str) -> tuple[str, ...]:
    """The control-plane addresses in ``text``: ``HOST:PORT`` entries
    separated by commas (IPv6 hosts in brackets). Raises ``ValueError``
    naming the entry that is not one; an empty ``text`` gives ``()``."""
    addresses = tuple(part.strip() for part in text.split(",") if part.strip())
    for address in addresses:
        match = _HOST_PORT.fullmatch(address)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise ValueError(f"{address!r} is not HOST:PORT")
    if len(set(addresses)) != len(addresses):
        raise ValueError("an address is listed twice")
    return addresses


@dataclass
class _Endpoint:
    address: str
    channel: aio.Channel
    stub: rs_grpc.RunnerServiceAsyncStub


class ControlClient:
    """Channels to the control plane. ``token`` is the runner token; build
    RPCs carry the build's own token.

    ``address`` is one ``HOST:PORT`` or several (a sequence, or one string
    separated by commas), all replicas of one control plane. One address is
    one channel: a name that resolves to several addresses is failed over by
    gRPC itself (pick_first re-resolves and tries the next), and calls wait
    for the channel while the control plane restarts. With several, every
    call goes to the replica in use while its channel is up; once it is not,
    the next call probes all of them at once and moves to the first that
    answers, so a dead replica costs its callers one failed call each, not
    an RPC deadline.

    ``addresses_file``, when given, names a file listing the addresses
    (commas or newlines; a Nomad or Consul template keeps it current). It is
    read again whenever the replica in use stops answering, so the runner
    follows replicas that moved; while it lists none, ``address`` is used.
    Raises ``ValueError`` when there is no address at all.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        token: str,
        *,
        tls_ca: str = "",
        addresses_file: Path | None = None,
    ) -> None:
        self.token = token
        self._options = [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            # Reconnect quickly after a control-plane restart.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        self._creds = (
            grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            if tls_ca
            else None
        )
        self._addresses_file = addresses_file
        addresses = split_addresses(address) if isinstance(address, str) else tuple(address)
        addresses = self._listed() or addresses
        if not addresses:
            raise ValueError("the control-plane address is required (--control)")
        self._endpoints = [self._open(target) for target in addresses]
        self._active = 0
        self._switching = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        # One fixed address: calls wait for its channel (a restarting control
        # plane is reached as soon as it serves). Otherwise a call on a
        # replica that went away fails at once, so the next try can go
        # elsewhere.
        self._wait_for_ready = len(self._endpoints) == 1 and addresses_file is None

    def _open(self, target: str) -> _Endpoint:
        channel = (
            aio.secure_channel(target, self._creds, options=self._options)
            if self._creds is not None
            else aio.insecure_channel(target, options=self._options)
        )
        return _Endpoint(target, channel, rs_grpc.RunnerServiceStub(channel))

    def _listed(self) -> tuple[str, ...]:
        """The addresses in ``addresses_file``; () when it has none or
        cannot be read or parsed (logged: the addresses in use stay)."""
        if self._addresses_file is None:
            return ()
        try:
            text = self._addresses_file.read_text(encoding="utf-8")
            return split_addresses(text.replace("\n", ","))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("control-plane addresses file %s: %s", self._addresses_file, exc)
            return ()

    def _follow_file(self) -> None:
        """Adopt the addresses the file lists now; channels of replicas no
        longer listed close once their calls had ``RPC_TIMEOUT`` to end."""
        listed = self._listed()
        if not listed or listed == self.addresses:
            return
        current = self.address
        kept = {endpoint.address: endpoint for endpoint in self._endpoints}
        self._endpoints = [
            kept.pop(target) if target in kept else self._open(target) for target in listed
        ]
        self._active = listed.index(current) if current in listed else 0
        for endpoint in kept.values():
            task = asyncio.create_task(endpoint.channel.close(RPC_TIMEOUT))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        log.info("control-plane addresses now %s", ", ".join(listed))

    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self._endpoints[self._active].address

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(endpoint.address for endpoint in self._endpoints)

    async def _endpoint(self) -> _Endpoint:
        """The replica to call: the one in use while its channel is ready,
        else the first of all that becomes ready within ``PROBE_SECONDS``
        (the addresses file read again first). Raises ``AioRpcError``
        UNAVAILABLE (retryable) when none does."""
        current = self._endpoints[self._active]
        if self._wait_for_ready or _ready(current.channel):
            return current
        async with self._switching:
            # Another caller may have moved on while this one waited.
            current = self._endpoints[self._active]
            if _ready(current.channel):
                return current
            self._follow_file()
            probes = {
                asyncio.create_task(endpoint.channel.channel_ready()): index
                for index, endpoint in enumerate(self._endpoints)
            }
            try:
                done, _ = await asyncio.wait(
                    probes, timeout=PROBE_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for probe in probes:
                    probe.cancel()
                await asyncio.gather(*probes, return_exceptions=True)
            ready = sorted(probes[probe] for probe in done if not probe.cancelled())
            if not ready:
                raise aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    aio.Metadata(),
                    aio.Metadata(),
                    f"no control-plane replica answered within {PROBE_SECONDS:g} s"
                    f" ({', '.join(self.addresses)})",
                    None,
                )
            chosen = self._active if self._active in ready else ready[0]
            if chosen != self._active:
                log.warning(
                    "control plane at %s unreachable; switching to %s",
                    current.address, self._endpoints[chosen].address,
                )  # fmt: skip
                self._active = chosen
            return self._endpoints[chosen]

    async def connect(
        self, requests: AsyncIterator[rs.ConnectRequest]
    ) -> AsyncGenerator[rs.ConnectResponse, None]:
        """Open the runner stream and yield what the control plane sends;
        raises ``AioRpcError`` when it breaks (or, with several addresses,
        when no replica answers within ``PROBE_SECONDS``).

        With one address the call waits for the channel to connect
        (wait_for_ready) instead of failing at once, so a restarted control
        plane is reached as soon as the channel's reconnect sees it.
        """
        endpoint = await self._endpoint()
        call = endpoint.stub.Connect(
            requests,
            metadata=(("authorization", f"Bearer {self.token}"),),
            wait_for_ready=self._wait_for_ready,
        )
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    async def report(self, token: str, request: rs.ReportStatusRequest) -> rs.ReportStatusResponse:
        """Raises ``AioRpcError``; DEADLINE_EXCEEDED after ``RPC_TIMEOUT``
        seconds of waiting for an unreachable control plane (retryable)."""
        endpoint = await self._endpoint()
        return await endpoint.stub.ReportStatus(
            request,
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=RPC_TIMEOUT,
            wait_for_ready=self._wait_for_ready,
        )

    async def append(
        self, token: str, build_id: str, seq: int, packed: bytes, final: bool
    ) -> rs.AppendLogsResponse:
        """Send one log batch; raises ``AioRpcError`` as ``report`` does."""
        endpoint = await self._endpoint()
        return await endpoint.stub.AppendLogs(
            rs.AppendLogsRequest(build_id=build_id, seq=seq, packed=packed, final=final),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=RPC_TIMEOUT,
            wait_for_ready=self._wait_for_ready,
        )

    async def close(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.channel.close(None)
        await asyncio.gather(*self._closing, return_exceptions=True)


def _ready(channel: aio.Channel) -> bool:
    return channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY


# Retries of an RPC the control plane did not take: from 0.1 s doubling up
# to RETRY_CAP, full jitter so a fleet of runners does not retry in step.
RPC_RETRY = RetryPolicy(base=0.1, cap=RETRY_CAP, retry_on=is_retryable)
