"""The only runner module that talks gRPC to the control plane.

It is also the only one that sees generated protobuf: callers pass and get
the runner's domain types (``runner.domain``), converted here both ways.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from common.retry import RetryPolicy
from common.settings import ConfigError
from conveyor.v1 import runner_service_pb2 as rs
from conveyor.v1 import runner_service_pb2_grpc as rs_grpc
from conveyor.v1 import types_pb2 as pb
from runner.domain import (
    Assignment,
    BuildStatus,
    Cancel,
    ControlMessage,
    EnvVar,
    Heartbeat,
    Hello,
    Registered,
    RunnerMessage,
    StatusReport,
    StepStatus,
    StepUpdate,
)

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
    naming the entry that is not one (the caller knows which setting held
    ``text`` and raises ``ConfigError`` naming it); an empty ``text`` gives
    ``()``."""
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
    Raises ``ValueError`` for an address that is not ``HOST:PORT`` and
    ``ConfigError`` (a ``ValueError``) when there is no address at all.
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
            raise ConfigError("--control", "the control-plane address is required")
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
        self, messages: AsyncIterator[RunnerMessage]
    ) -> AsyncGenerator[ControlMessage, None]:
        """Open the runner stream, send ``messages`` on it and yield what the
        control plane sends (a kind this runner does not know is skipped);
        raises ``AioRpcError`` when it breaks (or, with several addresses,
        when no replica answers within ``PROBE_SECONDS``).

        With one address the call waits for the channel to connect
        (wait_for_ready) instead of failing at once, so a restarted control
        plane is reached as soon as the channel's reconnect sees it.
        """

        async def requests() -> AsyncIterator[rs.ConnectRequest]:
            async for message in messages:
                yield runner_message_to_pb(message)

        endpoint = await self._endpoint()
        call = endpoint.stub.Connect(
            requests(),
            metadata=(("authorization", f"Bearer {self.token}"),),
            wait_for_ready=self._wait_for_ready,
        )
        try:
            async for response in call:
                message = control_message_from_pb(response)
                if message is not None:
                    yield message
        finally:
            call.cancel()

    async def report(self, token: str, report: StatusReport) -> None:
        """Raises ``AioRpcError``; DEADLINE_EXCEEDED after ``RPC_TIMEOUT``
        seconds of waiting for an unreachable control plane (retryable)."""
        endpoint = await self._endpoint()
        await endpoint.stub.ReportStatus(
            report_to_pb(report),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=RPC_TIMEOUT,
            wait_for_ready=self._wait_for_ready,
        )

    async def append(self, token: str, build_id: str, seq: int, packed: bytes, final: bool) -> None:
        """Send one log batch; raises ``AioRpcError`` as ``report`` does."""
        endpoint = await self._endpoint()
        await endpoint.stub.AppendLogs(
            rs.AppendLogsRequest(build_id=build_id, seq=seq, packed=packed, final=final),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=RPC_TIMEOUT,
            wait_for_ready=self._wait_for_ready,
        )

    async def close(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.channel.close(None)
        await asyncio.gather(*self._closing, return_exceptions=True)


# The statuses the runner reports, on the wire (tests/test_drift.py checks
# them against the proto).
BUILD_STATUS_TO_PB: dict[BuildStatus, pb.BuildStatus.ValueType] = {
    BuildStatus.INITIALIZING: pb.BUILD_STATUS_INITIALIZING,
    BuildStatus.RUNNING: pb.BUILD_STATUS_RUNNING,
    BuildStatus.SUCCEEDED: pb.BUILD_STATUS_SUCCEEDED,
    BuildStatus.FAILED: pb.BUILD_STATUS_FAILED,
    BuildStatus.CANCELED: pb.BUILD_STATUS_CANCELED,
    BuildStatus.TIMED_OUT: pb.BUILD_STATUS_TIMED_OUT,
    BuildStatus.ERRORED: pb.BUILD_STATUS_ERRORED,
}
STEP_STATUS_TO_PB: dict[StepStatus, pb.StepStatus.ValueType] = {
    StepStatus.RUNNING: pb.STEP_STATUS_RUNNING,
    StepStatus.SUCCEEDED: pb.STEP_STATUS_SUCCEEDED,
    StepStatus.FAILED: pb.STEP_STATUS_FAILED,
}


def assignment_from_pb(message: rs.Assignment) -> Assignment:
    return Assignment(
        build_id=message.build_id,
        build_token=message.build_token,
        project_id=message.project_id,
        project_name=message.project_name,
        repo_url=message.repo_url,
        branch=message.branch,
        commit_sha=message.commit_sha,
        root_directory=message.root_directory,
        step_names=tuple(message.step_names),
        step_commands=tuple(message.step_commands),
        env=tuple(EnvVar(e.name, e.value, e.secret) for e in message.env),
        run_timeout_seconds=message.run_timeout_seconds,
        kill_grace_seconds=message.kill_grace_seconds,
        network_isolated=message.network_isolated,
        cache_lockfiles=tuple(message.cache_lockfiles),
        cache_paths=tuple(message.cache_paths),
        production_branch=message.production_branch,
        cache_generation=message.cache_generation,
        production=message.production,
        pull_request=message.pull_request,
    )


def control_message_from_pb(message: rs.ConnectResponse) -> ControlMessage | None:
    """What the control plane said, or None for a kind this runner does not
    know (a newer control plane's): the runner goes on without it."""
    kind = message.WhichOneof("kind")
    if kind == "registered":
        return Registered(message.registered.runner_id, message.registered.heartbeat_seconds)
    if kind == "assignment":
        return assignment_from_pb(message.assignment)
    if kind == "cancel":
        cancel = message.cancel
        return Cancel(cancel.build_id, cancel.reason, cancel.grace_seconds)
    return None


def runner_message_to_pb(message: RunnerMessage) -> rs.ConnectRequest:
    if isinstance(message, Hello):
        return rs.ConnectRequest(
            hello=rs.RunnerHello(
                runner_id=message.runner_id,
                name=message.name,
                capacity=message.capacity,
                labels=list(message.labels),
                launcher=message.launcher,
                sandbox=message.sandbox,
                version=message.version,
                running_build_ids=list(message.running_build_ids),
            )
        )
    if isinstance(message, Heartbeat):
        return rs.ConnectRequest(
            heartbeat=rs.RunnerHeartbeat(busy=message.busy, draining=message.draining)
        )
    return rs.ConnectRequest(
        ack=rs.AssignmentAck(
            build_id=message.build_id, accepted=message.accepted, reason=message.reason
        )
    )


def report_to_pb(report: StatusReport) -> rs.ReportStatusRequest:
    return rs.ReportStatusRequest(
        build_id=report.build_id,
        status=(
            BUILD_STATUS_TO_PB[report.status]
            if report.status is not None
            else pb.BUILD_STATUS_UNSPECIFIED
        ),
        reason=report.reason,
        steps=[_step_to_pb(step) for step in report.steps],
        at=_timestamp(report.at),
        warnings=list(report.warnings),
    )


def _step_to_pb(step: StepUpdate) -> rs.StepUpdate:
    return rs.StepUpdate(
        index=step.index,
        name=step.name,
        status=STEP_STATUS_TO_PB[step.status],
        exit_code=step.exit_code or 0,
        has_exit_code=step.exit_code is not None,
        at=_timestamp(step.at),
    )


def _timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _ready(channel: aio.Channel) -> bool:
    return channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY


# Retries of an RPC the control plane did not take: from 0.1 s doubling up
# to RETRY_CAP, full jitter so a fleet of runners does not retry in step.
RPC_RETRY = RetryPolicy(base=0.1, cap=RETRY_CAP, retry_on=is_retryable)
