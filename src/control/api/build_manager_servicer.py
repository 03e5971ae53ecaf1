"""BuildManager: start, cancel, and stream the logs of builds."""

from __future__ import annotations

from collections.abc import AsyncIterator

from control.api import convert
from control.api.edge import Ctx, account_of_caller, principal
from control.api.fields import required
from control.builds.lifecycle import Lifecycle
from control.domain import cursor
from control.domain.build import BuildStatus
from control.errors import InvalidArgument
from control.logs.fanout import MESSAGE_LINES, LogHub
from control.metrics import ControlMetrics
from control.services.registry import Services
from control.storage.builds import BuildStore, is_uuid
from control.storage.logs import LogStore, encode_chunk
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import build_manager_pb2_grpc as bm_grpc

MAX_START_BATCH = 1000
# Lines of one ReadLogs page: the default, and the most a caller may ask.
DEFAULT_READ_LINES = 1000
MAX_READ_LINES = 10_000
# Lines per page of a packed history read (one message per stored chunk).
PACKED_PAGE_LINES = 50_000


class BuildManagerServicer(bm_grpc.BuildManagerServicer):
    def __init__(
        self,
        lifecycle: Lifecycle,
        builds: BuildStore,
        logs: LogStore,
        hub: LogHub,
        metrics: ControlMetrics,
        services: Services,
    ) -> None:
        self.services = services
        self.lifecycle = lifecycle
        self.builds = builds
        self.logs = logs
        self.hub = hub
        self.metrics = metrics

    async def StartBuild(
        self, request: bm.StartBuildRequest, context: Ctx
    ) -> bm.StartBuildResponse:
        if request.build_ids:
            if request.build_id:
                raise InvalidArgument("build_ids", "give build_id or build_ids, not both")
            if len(request.build_ids) > MAX_START_BATCH:
                raise InvalidArgument("build_ids", f"at most {MAX_START_BATCH} per call")
            if not all(is_uuid(b) for b in request.build_ids):
                raise InvalidArgument("build_ids", "must all be build ids")
            runners = await self.lifecycle.start_many(list(request.build_ids))
            return bm.StartBuildResponse(started=bool(runners), runners=runners)
        if not request.build_id:
            raise InvalidArgument("build_id", "is required")
        runner_id = await self.lifecycle.start(request.build_id)
        return bm.StartBuildResponse(started=runner_id is not None, runner_id=runner_id or "")

    async def CancelBuild(
        self, request: bm.CancelBuildRequest, context: Ctx
    ) -> bm.CancelBuildResponse:
        if not request.build_id:
            raise InvalidArgument("build_id", "is required")
        build = await self.lifecycle.cancel(
            account_of_caller(), request.build_id, by=principal().name
        )
        return bm.CancelBuildResponse(build=convert.build_to_pb(build))

    async def StreamLogs(
        self, request: bm.StreamLogsRequest, context: Ctx
    ) -> AsyncIterator[bm.StreamLogsResponse]:
        if not request.build_id:
            raise InvalidArgument("build_id", "is required")
        build = await self.builds.get(account_of_caller(), request.build_id)
        after = cursor.decode(request.cursor)
        self.metrics.log_streams.inc()
        try:
            if not request.follow and request.packed:
                while True:
                    chunks = await self.logs.read_packed(build.id, after, PACKED_PAGE_LINES)
                    if not chunks:
                        yield await self._end(build.id, after)
                        return
                    for first_line, data in chunks:
                        after = first_line + data.count("\n")
                        yield bm.StreamLogsResponse(
                            packed=data.encode(), first_line=first_line, cursor=cursor.encode(after)
                        )
            if not request.follow:
                while True:
                    lines = await self.logs.read(build.id, after, MESSAGE_LINES)
                    if not lines:
                        yield await self._end(build.id, after)
                        return
                    after = lines[-1].number
                    yield bm.StreamLogsResponse(
                        lines=[convert.line_to_pb(x) for x in lines], cursor=cursor.encode(after)
                    )
            async for lines, final in self.hub.follow(build.id, after, self._status):
                if lines and request.packed:
                    yield bm.StreamLogsResponse(
                        packed=encode_chunk(lines).encode(),
                        first_line=lines[0].number,
                        cursor=cursor.encode(lines[-1].number),
                    )
                    after = lines[-1].number
                elif lines:
                    after = lines[-1].number
                    yield bm.StreamLogsResponse(
                        lines=[convert.line_to_pb(x) for x in lines], cursor=cursor.encode(after)
                    )
                if final is not None:
                    yield bm.StreamLogsResponse(
                        cursor=cursor.encode(after),
                        status=convert.BUILD_STATUS_TO_PB[final],
                        complete=True,
                    )
        finally:
            self.metrics.log_streams.dec()

    async def ReadLogs(self, request: bm.ReadLogsRequest, context: Ctx) -> bm.ReadLogsResponse:
        caller = principal()
        build_id = required("build_id", request.build_id)
        builds = self.services.builds
        if request.tail:
            lines = await builds.log_tail(caller, build_id, request.tail)
        else:
            limit = request.limit or DEFAULT_READ_LINES
            if limit < 0 or limit > MAX_READ_LINES:
                raise InvalidArgument("limit", f"must be between 0 and {MAX_READ_LINES}")
            lines = await builds.log_lines(caller, build_id, cursor.decode(request.cursor), limit)
        # The status is read after the lines: a final status with no line
        # after this page means the log is complete.
        build = await builds.get(caller, build_id)
        after = lines[-1].number if lines else cursor.decode(request.cursor)
        complete = build.status.final and not await self.logs.read(build.id, after, 1)
        return bm.ReadLogsResponse(
            lines=[convert.line_to_pb(x) for x in lines],
            cursor=cursor.encode(after),
            first_line=lines[0].number if lines else 0,
            status=convert.BUILD_STATUS_TO_PB[build.status],
            complete=complete,
        )

    async def _end(self, build_id: str, after: int) -> bm.StreamLogsResponse:
        """The last message of a stream without follow: the build's status,
        read after the lines, and whether the log is complete (final, and no
        line stored after ``after``)."""
        status = await self._status(build_id)
        complete = status.final and not await self.logs.read(build_id, after, 1)
        return bm.StreamLogsResponse(
            cursor=cursor.encode(after),
            status=convert.BUILD_STATUS_TO_PB[status],
            complete=complete,
        )

    async def _status(self, build_id: str) -> BuildStatus:
        return (await self.builds.get(None, build_id)).status
