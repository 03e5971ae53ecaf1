"""Runner clients that speak the real runner protocol but run no jobs.

Each ``SimRunner`` opens `RunnerService.Connect` with a hello, heartbeats at
the interval the control plane gives in ``Registered``, acknowledges every
assignment at once and reports with the assignment's build token, exactly as
the agent does (see runner.agent and runner.build_run). What it reports:

* ``finish``: initializing, then succeeded, at once (a build that takes no
  time, so the scheduler is the only thing between a queued build and the
  next one);
* ``hold``: initializing, then running, and nothing more until it is closed
  (a long build that stays active).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from conveyor.v1 import runner_service_pb2 as rs
from conveyor.v1 import runner_service_pb2_grpc as rs_grpc
from conveyor.v1 import types_pb2 as pb

log = logging.getLogger(__name__)


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


class SimRunner:
    def __init__(
        self, channel: aio.Channel, token: str, capacity: int, behaviour: str, name: str
    ) -> None:
        if behaviour not in ("finish", "hold"):
            raise ValueError(f"behaviour must be finish or hold, not {behaviour!r}")
        self.stub = rs_grpc.RunnerServiceStub(channel)
        self.token = token
        self.capacity = capacity
        self.behaviour = behaviour
        self.name = name
        self.runner_id = str(uuid.uuid4())
        self.outbox: asyncio.Queue[rs.ConnectRequest] = asyncio.Queue()
        self.registered = asyncio.Event()
        self.heartbeat_seconds = 5.0
        self.assignments = 0
        self.reports = 0
        self.heartbeats = 0
        self.errors: list[str] = []
        self.active: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stream: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and wait (10 s at most) until registered."""
        self.outbox.put_nowait(
            rs.ConnectRequest(
                hello=rs.RunnerHello(
                    runner_id=self.runner_id, name=self.name, capacity=self.capacity,
                    launcher="bench", version="bench",
                )
            )
        )  # fmt: skip
        self._stream = asyncio.create_task(self._run(), name=f"sim-{self.name}")
        await asyncio.wait_for(self.registered.wait(), 10)
        self._beat = asyncio.create_task(self._heartbeat(), name=f"beat-{self.name}")

    async def _requests(self) -> AsyncIterator[rs.ConnectRequest]:
        while True:
            yield await self.outbox.get()

    async def _run(self) -> None:
        call = self.stub.Connect(
            self._requests(), metadata=(("authorization", f"Bearer {self.token}"),)
        )
        async for message in call:
            kind = message.WhichOneof("kind")
            if kind == "registered":
                self.heartbeat_seconds = float(message.registered.heartbeat_seconds or 5)
                self.registered.set()
            elif kind == "assignment":
                a = message.assignment
                self.assignments += 1
                self.outbox.put_nowait(
                    rs.ConnectRequest(ack=rs.AssignmentAck(build_id=a.build_id, accepted=True))
                )
                task = asyncio.create_task(self._build(a))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            self.heartbeats += 1
            self.outbox.put_nowait(
                rs.ConnectRequest(heartbeat=rs.RunnerHeartbeat(busy=len(self.active)))
            )

    async def _report(self, a: rs.Assignment, status: pb.BuildStatus.ValueType) -> None:
        await self.stub.ReportStatus(
            rs.ReportStatusRequest(build_id=a.build_id, status=status, at=_now()),
            metadata=(("authorization", f"Bearer {a.build_token}"),),
            timeout=60,
        )
        self.reports += 1

    async def _build(self, a: rs.Assignment) -> None:
        self.active.add(a.build_id)
        try:
            await self._report(a, pb.BUILD_STATUS_INITIALIZING)
            if self.behaviour == "finish":
                await self._report(a, pb.BUILD_STATUS_SUCCEEDED)
            else:
                await self._report(a, pb.BUILD_STATUS_RUNNING)
                return
        except aio.AioRpcError as exc:
            self.errors.append(f"{a.build_id}: {exc.code().name} {exc.details()}")
        self.active.discard(a.build_id)

    async def close(self) -> None:
        for task in (self._beat, self._stream, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aio.AioRpcError):
                    await task


class Fleet:
    """``count`` simulated runners of ``capacity`` slots, sharing a few
    channels (as many hosts would each hold one)."""

    def __init__(self, address: str, token: str, count: int, capacity: int, behaviour: str) -> None:
        self.channels = [aio.insecure_channel(address) for _ in range(min(count, 8))]
        self.runners = [
            SimRunner(self.channels[i % len(self.channels)], token, capacity, behaviour,
                      f"sim-{i}")
            for i in range(count)
        ]  # fmt: skip

    async def start(self) -> Fleet:
        await asyncio.gather(*(r.start() for r in self.runners))
        return self

    @property
    def errors(self) -> list[str]:
        return [e for r in self.runners for e in r.errors]

    def count(self, what: str) -> int:
        return int(sum(getattr(r, what) for r in self.runners))

    async def close(self) -> None:
        for runner in self.runners:
            await runner.close()
        for channel in self.channels:
            await channel.close(None)
