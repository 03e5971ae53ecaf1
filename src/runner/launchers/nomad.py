"""NomadLauncher: every build is one Nomad batch job (see docs/nomad.md).

Nomad is reached through one client (``nomad_client``): python-nomad
registers and deregisters the job, reads its evaluation and keeps the build's
secrets in a Nomad Variable; blocking queries on the allocation and the task
logs (a stream of JSON frames that a broken stream resumes at the bytes
already received, ``nomad_logs``) go beside it on aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from common.retry import RetryPolicy
from common.tasks import cancel_and_wait
from runner.errors import RunnerError
from runner.launchers.base import JobResult, JobSpec, LaunchError, OutputLine
from runner.launchers.nomad_client import LogStream, NomadApiError, NomadClient, NomadNotFound
from runner.launchers.nomad_job import (
    TASK,
    EventCursor,
    NomadSettings,
    build_job,
    describe_event,
    next_index,
    pick_allocation,
    placement_failure,
    task_result,
    task_started,
    variable_path,
    waits_for_capacity,
)
from runner.launchers.nomad_logs import (
    FrameDecoder,
    LineSplitter,
    LogCursor,
    LogStreamError,
    parse_frame,
)
from runner.metrics import RunnerMetrics

__all__ = ["NomadJob", "NomadLauncher", "NomadSettings", "NomadUnavailable"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_QUEUED_LINES = 10_000
_FINAL_READ_ATTEMPTS = 5
# A request that failed in transit is tried again soon (Nomad is usually
# back within seconds); how long to keep trying is the settings'
# ``unreachable_seconds``.
_TRANSIENT_RETRY = RetryPolicy(base=0.05, cap=2.0, jitter=(1.0, 1.0))
# A pending evaluation is read again after 20 ms, then less often, up to 1 s.
_EVALUATION_POLL = RetryPolicy(base=0.02, cap=1.0, jitter=(1.0, 1.0))


class NomadUnavailable(RunnerError):
    """Nomad refused a request, or did not answer for longer than the settings'
    ``unreachable_seconds``."""


# Failures worth another try while ``unreachable_seconds`` last.
_TRANSIENT = (NomadApiError, LogStreamError)
# Answers to reading the evaluation that no retry can change (bad request,
# a token without the capability).
_REFUSED = frozenset({400, 403})


class NomadLauncher:
    """Starts builds as Nomad batch jobs named ``conveyor-build-<build id>``.

    The caller must ``await close()``: it stops jobs still running, waits for
    their cleanup and closes the HTTP sessions.
    """

    name = "nomad"
    # A Nomad task runs on another host: the runner cannot hand it pipes.
    supports_cache = False
    control_channel = False

    def __init__(self, settings: NomadSettings, *, metrics: RunnerMetrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._nomad = NomadClient(settings)
        self._jobs: set[NomadJob] = set()
        self._undo: set[asyncio.Task[None]] = set()
        self._closed = False

    async def launch(self, spec: JobSpec) -> NomadJob:
        """Store the secrets, register the job and return it without waiting for
        placement. Raises ``LaunchError`` when Nomad refuses either."""
        if self._closed:
            raise LaunchError("the Nomad launcher is closed")
        job = build_job(spec, self._settings)
        var_path = variable_path(job["ID"]) if spec.secret_env else None
        submit = asyncio.ensure_future(self._submit(job, var_path, spec.secret_env))
        try:
            eval_id = await asyncio.shield(submit)
        except asyncio.CancelledError:
            # The submission may still succeed after the caller gave up on it.
            undo = asyncio.create_task(self._undo_submit(submit, job["ID"], var_path))
            self._undo.add(undo)
            undo.add_done_callback(self._undo.discard)
            raise
        if self._closed:
            await self._undo_submit(submit, job["ID"], var_path)
            raise LaunchError("the Nomad launcher closed while the job was being submitted")
        launched = NomadJob(self, job["ID"], eval_id, var_path)
        self._jobs.add(launched)
        launched.done_callback(lambda: self._jobs.discard(launched))
        return launched

    async def close(self) -> None:
        """Stop every job still running (Nomad kills it at once), wait for their
        cleanup, then close the sessions. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        jobs = list(self._jobs)
        for job in jobs:
            await job.stop(0)
        await _settle(
            [job.task for job in jobs] + list(self._undo),
            self._settings.kill_timeout_seconds + self._settings.request_timeout_seconds,
        )
        await self._nomad.close()

    async def _submit(
        self, job: dict[str, Any], var_path: str | None, secret_env: Mapping[str, str]
    ) -> str:
        if var_path is not None:
            try:
                await self._nomad.create_variable(var_path, secret_env)
            except NomadApiError as exc:
                self.count_error()
                raise LaunchError(f"Nomad refused the build's secrets: {exc}") from None
        try:
            answer = await self._nomad.register_job(job)
        except NomadApiError as exc:
            self.count_error()
            if var_path is not None:
                await self.delete_variable(var_path)
            raise LaunchError(f"could not register Nomad job {job['ID']}: {exc}") from None
        if answer.get("Warnings"):
            log.warning("Nomad accepted job %s with warnings: %s", job["ID"], answer["Warnings"])
        return str(answer.get("EvalID") or "")

    async def _undo_submit(
        self, submit: asyncio.Future[str], nomad_job_id: str, var_path: str | None
    ) -> None:
        with contextlib.suppress(Exception):
            await submit
        await self.deregister(nomad_job_id)
        if var_path is not None:
            await self.delete_variable(var_path)

    # What NomadJob uses of its launcher.

    @property
    def settings(self) -> NomadSettings:
        return self._settings

    @property
    def nomad(self) -> NomadClient:
        return self._nomad

    @property
    def metrics(self) -> RunnerMetrics | None:
        return self._metrics

    async def deregister(self, nomad_job_id: str) -> None:
        """Stop and purge a job; never raises (Nomad's KillTimeout still applies
        to a job whose deregistration failed once it is retried or GC'd)."""
        try:
            await self._nomad.deregister_job(nomad_job_id)
        except NomadNotFound:
            pass
        except NomadApiError as exc:
            self.count_error()
            log.warning("could not deregister Nomad job %s: %s", nomad_job_id, exc)

    async def delete_variable(self, var_path: str) -> None:
        """Delete a secrets Variable; never raises."""
        try:
            await self._nomad.delete_variable(var_path)
        except NomadNotFound:
            pass
        except NomadApiError as exc:
            self.count_error()
            log.warning("could not delete Nomad variable %s: %s", var_path, exc)

    def count_error(self) -> None:
        if self._metrics is not None:
            self._metrics.launcher_errors.labels(launcher=self.name).inc()


class NomadJob:
    """One build's Nomad job, made by ``NomadLauncher.launch``; see ``Job``.

    ``output()`` merges the task's stdout and stderr (each in order) with a
    ``system`` line per Nomad task event.
    """

    def __init__(
        self, launcher: NomadLauncher, nomad_job_id: str, eval_id: str, var_path: str | None
    ) -> None:
        self.job_id = nomad_job_id
        self._launcher = launcher
        self._settings = launcher.settings
        self._eval_id = eval_id
        self._var_path = var_path
        self._alloc_id: str | None = None
        self._queue: asyncio.Queue[OutputLine | None] = asyncio.Queue(_QUEUED_LINES)
        self._output_ended = False
        self._stop_requested = asyncio.Event()
        self._ended = asyncio.Event()
        self._deregistered = False
        self._followers: list[asyncio.Task[None]] = []
        self._launched_at = time.monotonic()
        self.task: asyncio.Task[JobResult] = asyncio.create_task(
            self._run(), name=f"nomad job {nomad_job_id}"
        )

    def done_callback(self, callback: Callable[[], None]) -> None:
        self.task.add_done_callback(lambda _task: callback())

    async def output(self) -> AsyncIterator[OutputLine]:
        """Yield lines until the job ended and its logs were read to the end.
        The caller must consume this before awaiting ``wait()``."""
        while not self._output_ended:
            line = await self._queue.get()
            if line is None:
                self._output_ended = True
                return
            yield line

    async def wait(self) -> JobResult:
        """How the job ended, once its logs were delivered and Nomad cleaned up."""
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.task.cancelled() and (current is None or not current.cancelling()):
                # The launcher was closed under the job, not our caller cancelled.
                return JobResult(None, error="the Nomad launcher closed before the job ended")
            raise

    async def stop(self, grace_seconds: float) -> None:
        """Deregister the job (Nomad sends SIGTERM, SIGKILL after KillTimeout)
        and, when ``grace_seconds`` is shorter than KillTimeout, send SIGKILL
        ourselves once it has passed. Never raises for Nomad's errors."""
        if self._ended.is_set():
            return
        self._stop_requested.set()
        if not self._deregistered:
            self._deregistered = True
            await self._launcher.deregister(self.job_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout=max(grace_seconds, 0.0))
            return
        if self._alloc_id is None or grace_seconds >= self._settings.kill_timeout_seconds:
            return
        try:
            await self._launcher.nomad.signal_allocation(self._alloc_id, "SIGKILL", TASK)
        except NomadApiError as exc:
            # Usually the task died meanwhile; otherwise KillTimeout still holds.
            log.info("could not SIGKILL %s: %s", self.job_id, _describe(exc))

    async def _run(self) -> JobResult:
        try:
            result = await self._outcome()
            self._ended.set()
            if result.error is not None:
                self._launcher.count_error()
            await asyncio.shield(self._forget_secrets())
            for failure in await asyncio.gather(*self._followers, return_exceptions=True):
                if failure is not None:
                    log.error("following the logs of %s failed", self.job_id, exc_info=failure)
            if not self._deregistered and (self._settings.purge_on_exit or result.error):
                # A failed placement leaves a blocked evaluation that would
                # run the build later, unobserved: always remove the job then.
                self._deregistered = True
                await asyncio.shield(self._launcher.deregister(self.job_id))
        except asyncio.CancelledError:
            self._ended.set()
            for follower in self._followers:
                follower.cancel()
            await asyncio.gather(*self._followers, return_exceptions=True)
            self._abandon_output()
            await asyncio.shield(self._forget_secrets())
            raise
        await self._queue.put(None)
        return result

    async def _outcome(self) -> JobResult:
        try:
            return await self._supervise()
        except NomadUnavailable as exc:
            return JobResult(None, error=f"lost contact with Nomad: {exc}")
        except Exception as exc:
            # A bug, or an answer Nomad should never give: it ends this build
            # with an error instead of leaving its output open forever.
            log.exception("supervising Nomad job %s failed", self.job_id)
            return JobResult(None, error=f"the Nomad launcher failed: {exc!r}")

    async def _supervise(self) -> JobResult:
        evaluation = await self._await_evaluation()
        reason: str | None = None
        if evaluation is not None:
            if evaluation.get("Status") == "failed":
                why = evaluation.get("StatusDescription") or "evaluation failed"
                return JobResult(None, error=f"Nomad could not schedule the job: {why}")
            reason = placement_failure(evaluation)
            if reason is not None and not waits_for_capacity(evaluation):
                return JobResult(None, error=f"placement failed: {reason}")
        if reason is None:
            alloc_id = await self._await_allocation()
        else:
            try:
                alloc_id = await self._await_capacity(reason)
            except TimeoutError:
                limit = self._settings.startup_timeout_seconds
                return JobResult(
                    None, error=f"placement failed: no Nomad capacity within {limit:g} s: {reason}"
                )
        if alloc_id is None:
            return JobResult(None, killed=True)
        self._alloc_id = alloc_id
        return await self._watch_allocation(alloc_id)

    async def _await_capacity(self, reason: str) -> str | None:
        """Wait for the allocation of a job Nomad queued for lack of capacity
        (a blocked evaluation), or None when stopped first. Raises
        ``TimeoutError`` when the startup deadline, counted from the launch,
        passes first."""
        started = time.monotonic()
        remaining = max(self._launched_at + self._settings.startup_timeout_seconds - started, 0.0)
        log.info("Nomad job %s waits for capacity: %s", self.job_id, reason)
        note = f"nomad: waiting for Nomad capacity ({reason}), up to {remaining:.0f} s"
        await self._queue.put(OutputLine("system", note.encode()))
        metrics = self._launcher.metrics
        if metrics is not None:
            metrics.nomad_capacity_waits.inc()
        try:
            async with asyncio.timeout(remaining):
                alloc_id = await self._await_allocation()
        finally:
            if metrics is not None:
                metrics.nomad_capacity_waits.dec()
        if alloc_id is not None:
            waited = time.monotonic() - started
            log.info("Nomad placed job %s after %.1f s", self.job_id, waited)
            note = f"nomad: placed after waiting {waited:.0f} s for capacity"
            await self._queue.put(OutputLine("system", note.encode()))
        return alloc_id

    async def _await_evaluation(self) -> Mapping[str, Any] | None:
        if not self._eval_id:
            return None
        patience = _Patience(self._settings.unreachable_seconds)
        polls = 0
        while True:
            try:
                evaluation = await self._launcher.nomad.read_evaluation(self._eval_id)
            except NomadNotFound:
                return None
            except NomadApiError as exc:
                if exc.status in _REFUSED:
                    raise NomadUnavailable(str(exc)) from None
                await patience.failed(exc)
                continue
            patience.ok()
            if evaluation.get("Status") not in ("pending", None):
                return evaluation
            polls += 1
            await asyncio.sleep(_EVALUATION_POLL.delay(polls))

    async def _await_allocation(self) -> str | None:
        """The ID of the job's allocation, or None when the job was stopped
        before Nomad made one."""
        path = f"/v1/job/{self.job_id}/allocations"
        patience = _Patience(self._settings.unreachable_seconds)
        index = 0
        while True:
            stopping = self._stop_requested.is_set()
            try:
                if stopping:
                    allocs, new_index = await self._launcher.nomad.blocking_get(path, 0)
                else:
                    answer = await self._unless_stopped(
                        self._launcher.nomad.blocking_get(path, index)
                    )
                    if answer is None:
                        continue
                    allocs, new_index = answer
            except NomadNotFound:
                allocs, new_index = [], index
            except _TRANSIENT as exc:
                await patience.failed(exc)
                continue
            patience.ok()
            chosen = pick_allocation(allocs, self._eval_id)
            if chosen is not None:
                return chosen
            if stopping:
                return None
            index = next_index(index, new_index)

    async def _watch_allocation(self, alloc_id: str) -> JobResult:
        path = f"/v1/allocation/{alloc_id}"
        patience = _Patience(self._settings.unreachable_seconds)
        index = 0
        events = EventCursor()
        while True:
            try:
                alloc, new_index = await self._launcher.nomad.blocking_get(path, index)
            except NomadNotFound:
                if self._stop_requested.is_set():
                    return JobResult(None, killed=True)
                return JobResult(None, error=f"allocation {alloc_id} disappeared from Nomad")
            except _TRANSIENT as exc:
                await patience.failed(exc)
                continue
            patience.ok()
            for event in events.take_new(alloc):
                await self._queue.put(
                    OutputLine("system", f"nomad: {describe_event(event)}".encode())
                )
            if task_started(alloc) and not self._followers:
                self._followers = [
                    asyncio.create_task(self._follow(alloc_id, "stdout")),
                    asyncio.create_task(self._follow(alloc_id, "stderr")),
                ]
            result = task_result(alloc, stop_requested=self._stop_requested.is_set())
            if result is not None:
                return result
            index = next_index(index, new_index)

    async def _unless_stopped(self, query: Any) -> Any:
        """Await ``query`` unless ``stop()`` is called first; then None."""
        answer = asyncio.ensure_future(query)
        stopped = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({answer, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(stopped, answer)
        return answer.result() if not answer.cancelled() else None

    async def _follow(self, alloc_id: str, stream: LogStream) -> None:
        """Copy one log stream into the output until the task has ended and a
        final, non-following read found nothing more."""
        cursor = LogCursor(TASK, stream)
        lines = LineSplitter()
        patience = _Patience(self._settings.unreachable_seconds)
        fruitless = 0  # reads of the finished task that broke without progress
        first = True
        while True:
            final = self._ended.is_set()
            if not first:
                await self._rebase(alloc_id, stream, cursor)
            first = False
            received = cursor.received
            try:
                await self._read_log(alloc_id, stream, cursor, lines, follow=not final)
                patience.ok()
            except _TRANSIENT as exc:
                if cursor.received > received:
                    # A stream that broke after delivering something is worth
                    # resuming at once, however often it breaks.
                    patience.ok()
                    fruitless = 0
                    continue
                fruitless += final
                try:
                    if fruitless >= _FINAL_READ_ATTEMPTS:
                        raise NomadUnavailable(_describe(exc)) from exc
                    await patience.failed(exc)
                except NomadUnavailable as gone:
                    note = f"nomad: could not read the task's {stream}: {gone}"
                    await self._queue.put(OutputLine("system", note.encode()))
                    break
                continue
            if final:
                break
            if not self._ended.is_set():
                # Nomad closed a following stream on its own; reconnect gently.
                await asyncio.sleep(0.1)
        tail = lines.flush()
        if tail is not None:
            await self._queue.put(OutputLine(stream, tail))

    async def _rebase(self, alloc_id: str, stream: LogStream, cursor: LogCursor) -> None:
        """Before reading again, place the cursor in the log files on disk now:
        once logmon deleted the oldest, Nomad's offsets count from the next
        one, and the bytes counted would resume past unread output. Without
        a listing (the token lacks ``read-fs``, Nomad is busy) the count stands."""
        try:
            listing = await self._launcher.nomad.blocking_get(
                f"/v1/client/fs/ls/{alloc_id}", 0, {"path": "alloc/logs"}
            )
        except _TRANSIENT as exc:
            log.debug("could not list the logs of %s: %s", self.job_id, _describe(exc))
            return
        if cursor.rebase(listing[0]):
            note = (
                f"nomad: some of the task's {stream} was rotated away before it was read "
                f"(LogConfig keeps {self._settings.log_max_files} files of "
                f"{self._settings.log_max_file_mb} MB)"
            )
            await self._queue.put(OutputLine("system", note.encode()))

    async def _read_log(
        self,
        alloc_id: str,
        stream: LogStream,
        cursor: LogCursor,
        lines: LineSplitter,
        *,
        follow: bool,
    ) -> None:
        drain = self._settings.log_drain_seconds
        frames = FrameDecoder()
        async with self._launcher.nomad.logs(alloc_id, stream, cursor.position, follow) as content:
            last_data = time.monotonic()
            while True:
                if follow:
                    try:
                        chunk = await asyncio.wait_for(content.readany(), min(drain, 0.25))
                    except TimeoutError:
                        # A following stream never ends by itself: once the
                        # task is dead and the stream went quiet, it is done.
                        if self._ended.is_set() and time.monotonic() - last_data >= drain:
                            return
                        continue
                else:
                    chunk = await content.readany()
                if not chunk:
                    if frames.pending:
                        raise LogStreamError("the log stream ended inside a frame")
                    return
                for raw in frames.feed(chunk):
                    frame = parse_frame(raw)
                    if frame is None:
                        continue  # a heartbeat
                    if frame.file_event:
                        # Logmon deleted (rotated away) or truncated the file
                        # being read: what it held past here is gone.
                        note = f"nomad: {stream} log {frame.file}: {frame.file_event}"
                        await self._queue.put(OutputLine("system", note.encode()))
                    complete = lines.feed(frame.data)
                    # Advance before yielding lines: a stream broken while we
                    # wait on the consumer must not deliver them twice.
                    cursor.advance(frame)
                    last_data = time.monotonic()
                    for line in complete:
                        await self._queue.put(OutputLine(stream, line))

    async def _forget_secrets(self) -> None:
        if self._var_path is not None:
            var_path, self._var_path = self._var_path, None
            await self._launcher.delete_variable(var_path)

    def _abandon_output(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)


class _Patience:
    """Retries transient errors with backoff until ``limit`` seconds pass
    without a success, then raises ``NomadUnavailable``."""

    def __init__(self, limit: float) -> None:
        self._backoff = replace(_TRANSIENT_RETRY, deadline=limit).backoff()

    async def failed(self, exc: BaseException) -> None:
        delay = self._backoff.failed(exc)
        if delay is None:
            raise NomadUnavailable(_describe(exc)) from exc
        log.debug("Nomad request failed, retrying: %s", _describe(exc))
        await asyncio.sleep(delay)

    def ok(self) -> None:
        self._backoff.succeeded()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _settle(tasks: list[asyncio.Task[Any]], seconds: float) -> None:
    """Wait up to ``seconds`` for tasks to finish, then cancel the rest."""
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
