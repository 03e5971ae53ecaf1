"""RunnerService: the runner agents' stream, status reports and log batches."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from common.tasks import cancel_and_wait
from control.api import convert
from control.api.edge import Ctx, principal
from control.builds.lifecycle import AssignmentData, Lifecycle, StepReport, now
from control.domain.cache import effective_lockfiles, effective_paths
from control.errors import InvalidArgument, PermissionDenied
from control.logs.admission import LogAdmission
from control.logs.fanout import LogHub
from control.metrics import ControlMetrics
from control.storage.builds import is_uuid
from control.storage.logs import STREAM_CODES, LogStore, check_packed, encode_lines
from control.storage.notify import Notifier
from control.storage.runners import RunnerStore
from conveyor.v1 import runner_service_pb2 as rs
from conveyor.v1 import runner_service_pb2_grpc as rs_grpc

log = logging.getLogger(__name__)

MAX_BATCH_LINES = 20_000
HELLO_TIMEOUT = 10.0
# The dispatch loop re-reads the database at least this often. NOTIFY wakes
# it for every assignment and cancel, and the LISTEN connection wakes every
# stream after a reconnect, so this is only the last resort; each wake of
# each connected runner costs a transaction.
DISPATCH_RECHECK = 30.0


def assignment_to_pb(data: AssignmentData, kill_grace: int) -> rs.ConnectResponse:
    build, project = data.build, data.project
    # The runner reads empty lock-file patterns as "cache off".
    lockfiles: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    if not project.cache_disabled:
        lockfiles = effective_lockfiles(project.cache_lockfiles)
        paths = effective_paths(project.cache_paths)
    return rs.ConnectResponse(
        assignment=rs.Assignment(
            build_id=build.id,
            build_token=data.token,
            project_id=project.id,
            project_name=project.name,
            repo_url=project.repo_url,
            branch=build.branch,
            commit_sha=build.commit_sha,
            root_directory=project.root_directory,
            step_names=list(data.step_names),
            step_commands=list(data.step_commands),
            run_timeout_seconds=data.run_timeout,
            kill_grace_seconds=kill_grace,
            network_isolated=project.network_isolated,
            cache_lockfiles=list(lockfiles),
            cache_paths=list(paths),
            production_branch=project.production_branch,
            cache_generation=project.cache_generation,
            production=build.production,
            pull_request=data.pull_request or 0,
            env=[rs.EnvVar(name=v.name, value=v.value, secret=v.secret) for v in data.env],
        )
    )


class RunnerServicer(rs_grpc.RunnerServiceServicer):
    def __init__(
        self,
        lifecycle: Lifecycle,
        runners: RunnerStore,
        logs: LogStore,
        hub: LogHub,
        notifier: Notifier,
        metrics: ControlMetrics,
        heartbeat_seconds: float,
        admission: LogAdmission,
    ) -> None:
        self.admission = admission
        self.lifecycle = lifecycle
        self.runners = runners
        self.logs = logs
        self.hub = hub
        self.notifier = notifier
        self.metrics = metrics
        self.heartbeat_seconds = heartbeat_seconds
        self._busy: dict[str, int] = {}

    async def Connect(
        self, request_iterator: AsyncIterator[rs.ConnectRequest], context: Ctx
    ) -> AsyncIterator[rs.ConnectResponse]:
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT)
        except (StopAsyncIteration, TimeoutError):
            raise InvalidArgument("hello", "a runner must say hello first") from None
        if first.WhichOneof("kind") != "hello":
            raise InvalidArgument("hello", "a runner must say hello first")
        hello = first.hello
        if hello.capacity < 0 or hello.capacity > 1000:
            raise InvalidArgument("capacity", "must be between 0 and 1000")
        runner_id = hello.runner_id if is_uuid(hello.runner_id) else str(uuid.uuid4())
        session_id = str(uuid.uuid4())
        await self.runners.register(
            runner_id,
            hello.name[:128],
            hello.capacity,
            list(hello.labels)[:64],
            hello.launcher,
            session_id,
            sandbox=_sandbox(hello.sandbox),
        )
        await self.lifecycle.forget_missing(runner_id, set(hello.running_build_ids))
        log.info(
            "runner %s (%s) connected, capacity %d, sandbox %s",
            runner_id, hello.name, hello.capacity, hello.sandbox or "unknown",
        )  # fmt: skip
        wake = asyncio.Event()
        wake.set()

        def on_runner(payload: str | None) -> None:
            if payload in (None, runner_id):
                wake.set()

        unsubscribe = self.notifier.subscribe("conveyor_runner", on_runner)
        reader = asyncio.create_task(self._read(runner_id, request_iterator))
        self.metrics.runners_connected.inc()
        self.metrics.runner_capacity.inc(hello.capacity)
        try:
            yield rs.ConnectResponse(
                registered=rs.Registered(
                    runner_id=runner_id, heartbeat_seconds=max(1, int(self.heartbeat_seconds))
                )
            )
            self.notifier.publish_local("conveyor_queue", None)
            while not reader.done():
                waiter = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait(
                        {waiter, reader},
                        timeout=DISPATCH_RECHECK,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    await cancel_and_wait(waiter)
                if reader.done():
                    if not reader.cancelled() and (exc := reader.exception()) is not None:
                        log.warning("runner %s stream failed: %s", runner_id, exc)
                    break
                wake.clear()
                work = await self.lifecycle.dispatch(runner_id, session_id)
                if work is None:
                    log.info("runner %s reconnected elsewhere; ending its older stream", runner_id)
                    return
                assignments, cancels = work
                for data in assignments:
                    log.info(
                        "assigning build to runner %s", runner_id, extra={"build_id": data.build.id}
                    )
                    yield assignment_to_pb(data, self.lifecycle.settings.kill_grace)
                for build_id, reason, grace in cancels:
                    log.info(
                        "asking runner %s to stop: %s",
                        runner_id,
                        reason,
                        extra={"build_id": build_id},
                    )
                    yield rs.ConnectResponse(
                        cancel=rs.CancelAssignment(
                            build_id=build_id, reason=reason, grace_seconds=grace
                        )
                    )
        finally:
            unsubscribe()
            await cancel_and_wait(reader)
            self.metrics.runners_connected.dec()
            self.metrics.runner_capacity.dec(hello.capacity)
            self.metrics.runner_busy.dec(self._busy.pop(runner_id, 0))
            await asyncio.shield(self.runners.disconnected(runner_id, session_id))
            log.info("runner %s disconnected", runner_id)

    async def _read(self, runner_id: str, requests: AsyncIterator[rs.ConnectRequest]) -> None:
        async for message in requests:
            kind = message.WhichOneof("kind")
            if kind == "heartbeat":
                busy = max(0, message.heartbeat.busy)
                self.metrics.runner_busy.inc(busy - self._busy.get(runner_id, 0))
                self._busy[runner_id] = busy
                await self.runners.heartbeat(runner_id, draining=message.heartbeat.draining)
            elif kind == "ack" and not message.ack.accepted:
                await self.lifecycle.refused(message.ack.build_id, runner_id, message.ack.reason)

    async def ReportStatus(
        self, request: rs.ReportStatusRequest, context: Ctx
    ) -> rs.ReportStatusResponse:
        _own_build(_build_id(request.build_id))
        status = None
        if request.status:
            if request.status not in convert.BUILD_STATUS_FROM_PB:
                raise InvalidArgument("status", "is not a build status")
            status = convert.BUILD_STATUS_FROM_PB[request.status]
        steps = []
        for step in request.steps:
            if step.status not in convert.STEP_STATUS_FROM_PB:
                raise InvalidArgument("steps.status", "is not a step status")
            steps.append(
                StepReport(
                    index=step.index,
                    status=convert.STEP_STATUS_FROM_PB[step.status],
                    exit_code=step.exit_code if step.has_exit_code else None,
                    at=convert.from_timestamp(step.at) or now(),
                )
            )
        result = await self.lifecycle.report(
            request.build_id,
            status,
            reason=request.reason[:1024],
            steps=steps,
            at=convert.from_timestamp(request.at),
            warnings=[w[:512] for w in request.warnings[:16]],
        )
        return rs.ReportStatusResponse(status=convert.BUILD_STATUS_TO_PB[result])

    async def AppendLogs(
        self, request: rs.AppendLogsRequest, context: Ctx
    ) -> rs.AppendLogsResponse:
        build_id = _build_id(request.build_id)
        _own_build(build_id)
        if request.seq < 1:
            raise InvalidArgument("seq", "must be >= 1")
        if request.packed:
            if request.lines:
                raise InvalidArgument("lines", "send lines or packed, not both")
            text = request.packed.decode("utf-8", errors="replace")
            count = check_packed(text, MAX_BATCH_LINES)
        else:
            if len(request.lines) > MAX_BATCH_LINES:
                raise InvalidArgument("lines", f"at most {MAX_BATCH_LINES} lines per batch")
            streams = convert.STREAM_FROM_PB
            lines = []
            for line in request.lines:
                stream = streams.get(line.stream)
                if stream is None or stream not in STREAM_CODES:
                    raise InvalidArgument("lines.stream", "is not a log stream")
                lines.append((line.time_unix_ms, stream, line.text))
            text, count = encode_lines(lines), len(lines)
        # Raises ResourceExhausted while the database's disk is low: the
        # runner keeps the batch and sends it again.
        verdict = await self.admission.admit(build_id, len(text))
        result = await self.logs.append_packed(
            build_id, request.seq, text, count, close_with=verdict.close_with
        )
        if result.duplicate:
            self.metrics.log_batches_duplicate.inc()
        else:
            self.admission.stored(verdict, result.bytes)
            if result.closed and verdict.warning:
                log.warning("log closed: %s", verdict.warning, extra={"build_id": build_id})
                await self.lifecycle.warn(build_id, [verdict.warning])
            self.metrics.log_lines.inc(result.count)
            self.metrics.log_bytes.inc(result.bytes)
            self.hub.ingested(build_id, result)
        return rs.AppendLogsResponse(last_line=result.last_line, duplicate=result.duplicate)


def _build_id(value: str) -> str:
    if not is_uuid(value):
        raise InvalidArgument("build_id", "must be a build id")
    return value


def _own_build(build_id: str) -> None:
    """Raise ``PermissionDenied`` unless the caller's build token (resolved
    by the edge) is the token of ``build_id``."""
    if principal().build_id != str(uuid.UUID(build_id)):
        raise PermissionDenied("the build token is not valid for this build (or it ended)")


def _sandbox(value: str) -> str:
    """The hello's sandbox mode, stored as said (a newer runner may name a
    mode this control plane does not know); raises ``InvalidArgument`` for
    one no list could show."""
    if len(value) > 32 or not value.isprintable():
        raise InvalidArgument("sandbox", "must be at most 32 printable characters")
    return value
