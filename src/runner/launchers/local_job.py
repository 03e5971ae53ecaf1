"""One build running on this host under the local launcher.

Reads the job's output, enforces the limits the kernel does not (the
build's total CPU time, the workspace size when it is only measured), stops
it on request, and afterwards reports which limits it hit and releases
everything the launcher gave it: cgroups, workspace, build uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psutil

from runner.launchers.base import JobResult, Limits, OutputLine, Stream
from runner.launchers.build_users import BuildUser, BuildUsers, kill_processes_of
from runner.launchers.cgroups import BuildCgroup
from runner.launchers.lines import LineCutter
from runner.launchers.user_network import UserNetwork
from runner.launchers.workspace import Workspace
from runner.metrics import RunnerMetrics

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
MAX_CONTROL_LINE = 256
# Reads of one output stream per wake-up (then the others get their turn),
# and before a control line (bounded: a process a step left behind may
# write without end).
_READS_PER_TURN = 16
_READS_BEFORE_MARKER = 64
_MiB = 1024 * 1024
# How often the limits are checked: cgroup counters and statvfs are cheap;
# walking a workspace tree (without a filesystem of its own) is not.
WATCH_INTERVAL = 0.25
TREE_WALK_INTERVAL = 2.0


@dataclass(frozen=True)
class Grant:
    """What the launcher gave one job, to be given back when it ends."""

    workspace: Workspace
    cgroup: BuildCgroup | None
    user: BuildUser | None
    users: BuildUsers | None

    def release(self, *, keep_workspace: bool) -> None:
        """Blocking: kill whatever of the job is left, then free its
        cgroups, workspace and uid."""
        try:
            if self.cgroup is not None:
                self.cgroup.kill_all()
                self.cgroup.remove()
            if self.user is not None:
                kill_processes_of(self.user.uid)
            self.workspace.remove(keep=keep_workspace)
        finally:
            if self.user is not None and self.users is not None:
                self.users.release(self.user)


class _Source:
    """One non-blocking descriptor the job writes lines to."""

    def __init__(self, fd: int, name: Stream) -> None:
        self.fd = fd
        self.name = name
        self.lines = LineCutter()
        self.open = True
        # Whether the last read filled its buffer (more may be waiting).
        self.more = False

    def read_lines(self, loop: asyncio.AbstractEventLoop) -> list[OutputLine]:
        """One read: the complete lines it finished (cut by
        ``LineCutter``), and at the end of the stream its last line."""
        self.more = False
        if not self.open:
            return []
        try:
            chunk = os.read(self.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            chunk = b""
        if not chunk:
            tail = self.lines.flush()
            last = [OutputLine(self.name, tail)] if tail is not None else []
            self.close(loop)
            return last
        self.more = len(chunk) == READ_CHUNK
        return [OutputLine(self.name, line) for line in self.lines.feed(chunk)]

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.open:
            self.open = False
            loop.remove_reader(self.fd)
            os.close(self.fd)


class LocalJob:
    """A build running on this host (see ``runner.launchers.base.Job``)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        build_id: str,
        limits: Limits,
        grant: Grant,
        keep_workspace: bool,
        warning: str | None,
        env_writer: asyncio.Task[None],
        output_fds: tuple[int, int],
        control_fd: int = -1,
        metrics: RunnerMetrics | None = None,
        network: UserNetwork | None = None,
    ) -> None:
        self.metrics = metrics
        self.network = network
        self.proc = proc
        self.build_id = build_id
        self.sandboxed = warning is None
        self.limits = limits
        self.grant = grant
        self.keep_workspace = keep_workspace
        self.warning = warning
        self.extra = {"build_id": build_id}
        self._env_writer = env_writer
        # One item per read (a list of lines), not per line: a queue hand-off
        # per line cost as much as everything else the runner does per line.
        # Bounded, so a slow consumer stalls the pipe rather than memory.
        self._queue: asyncio.Queue[list[OutputLine] | None] = asyncio.Queue(maxsize=256)
        # The job takes ownership of the descriptors (the read ends of its
        # stdout and stderr, the runner's end of its control channel).
        self._pumps = [asyncio.create_task(self._pump(*output_fds, control_fd))]
        self._watchdog = asyncio.create_task(self._watch_limits())
        # Opened now, while the job still runs (it waits for its
        # environment): readable once the script has ended.
        try:
            self._pidfd: int | None = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            self._pidfd = None  # gone already
        self._reaper = asyncio.create_task(self._reap())
        self._killed = False
        self._limit_error: str | None = None
        self._workspace_full = False
        self._stopping: asyncio.Task[None] | None = None
        self._conclusion: asyncio.Task[tuple[JobResult, list[str]]] | None = None

    @property
    def workspace(self) -> Workspace:
        return self.grant.workspace

    @property
    def cgroup(self) -> BuildCgroup | None:
        return self.grant.cgroup

    @property
    def user(self) -> BuildUser | None:
        """The build user the job runs as (None: the runner's own uid)."""
        return self.grant.user

    @property
    def uid(self) -> int | None:
        return self.grant.user.uid if self.grant.user else None

    async def _pump(self, stdout: int, stderr: int, control: int) -> None:
        """Read the job's stdout, stderr and control channel to their ends.

        A control line is queued after every byte of output the job wrote
        before it (a marker of the script's is written once the step it ends
        has exited), then acknowledged: the script waits for that before it
        starts the next step, so a step's header lands in the log before the
        step's first line."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        sources = [_Source(stdout, "stdout"), _Source(stderr, "stderr")]
        output = list(sources)
        channel = _Source(control, "control") if control >= 0 else None
        if channel is not None:
            sources.append(channel)
        for source in sources:
            os.set_blocking(source.fd, False)
            loop.add_reader(source.fd, wake.set)
        try:
            while any(source.open for source in sources):
                await wake.wait()
                wake.clear()
                for source in output:
                    await self._drain(source, reads=_READS_PER_TURN)
                if channel is None or not channel.open:
                    continue
                for line in channel.read_lines(loop):
                    if len(line.data) > MAX_CONTROL_LINE:
                        continue  # not the script's: it writes short lines
                    for source in output:
                        await self._drain(source, reads=_READS_BEFORE_MARKER, flush=True)
                    await self._queue.put([line])
                    try:
                        os.write(channel.fd, b"ok\n")
                    except OSError:
                        pass  # the script went away or stopped reading: it goes on
        finally:
            for source in sources:
                source.close(loop)
            await self._queue.put(None)

    async def _drain(self, source: _Source, *, reads: int, flush: bool = False) -> None:
        """Queue what ``source`` holds now, in at most ``reads`` reads;
        with ``flush``, also a last line without its newline."""
        loop = asyncio.get_running_loop()
        for _ in range(reads):
            if not source.open:
                break
            batch = source.read_lines(loop)
            if batch:
                await self._queue.put(batch)
            if not source.more:
                break
        if flush and (tail := source.lines.flush()) is not None:
            await self._queue.put([OutputLine(source.name, tail)])

    async def output(self) -> AsyncIterator[OutputLine]:
        """The build's lines, then ``system`` lines for every limit it hit."""
        if self.warning:
            yield OutputLine("system", self.warning.encode())
        done = 0
        while done < len(self._pumps):
            items = await self._queue.get()
            if items is None:
                done += 1
                continue
            for item in items:
                yield item
        _result, notes = await self._concluded()
        for note in notes:
            yield OutputLine("system", note.encode())

    async def wait(self) -> JobResult:
        result, _notes = await self._concluded()
        return result

    def _concluded(self) -> asyncio.Future[tuple[JobResult, list[str]]]:
        if self._conclusion is None:
            self._conclusion = asyncio.create_task(self._conclude())
        # Shielded: a caller giving up must not interrupt the clean-up.
        return asyncio.shield(self._conclusion)

    async def _conclude(self) -> tuple[JobResult, list[str]]:
        code = await self.proc.wait()
        if self.network is not None:
            await self.network.close()
        await asyncio.gather(*self._pumps, self._env_writer, return_exceptions=True)
        self._watchdog.cancel()
        if self._stopping:
            with contextlib.suppress(asyncio.CancelledError):
                self._stopping.cancel()
                await self._stopping
        await self._reaper
        hits, notes, limit_error = await asyncio.to_thread(self._findings)
        for note in notes:
            log.warning("build hit a limit: %s", note, extra=self.extra)
        for hit in hits:
            if self.metrics is not None:
                self.metrics.sandbox_limit_hits.labels(hit).inc()
        await asyncio.to_thread(self.grant.release, keep_workspace=self.keep_workspace)
        if self._limit_error:
            return JobResult(exit_code=None, error=self._limit_error, killed=True), notes
        if code < 0:
            return JobResult(exit_code=128 - code, killed=True), notes
        if code != 0 and limit_error and not self._killed:
            return JobResult(exit_code=code, error=limit_error), notes
        return JobResult(exit_code=code, killed=self._killed), notes

    async def _reap(self) -> None:
        """Once the build script ended, end whatever it left running: in the
        sandbox its pid namespace takes care of that, but without one a
        background process would live on, and keep the output open (which
        ``proc.wait()`` waits for, hence the pidfd)."""
        if self._pidfd is not None:
            ended = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_reader(self._pidfd, ended.set)
            try:
                await ended.wait()
            finally:
                loop.remove_reader(self._pidfd)
                os.close(self._pidfd)
        grant = self.grant
        if grant.cgroup is not None:
            await asyncio.to_thread(grant.cgroup.kill_all)
        if grant.user is not None:
            await asyncio.to_thread(kill_processes_of, grant.user.uid)
        elif not self.sandboxed:
            self._kill_group()

    def _findings(self) -> tuple[set[str], list[str], str | None]:
        """Blocking. Which limits the job hit (memory, processes, cpu,
        workspace), the log notes on them, and the error to report if it
        failed."""
        hits: set[str] = set()
        notes: list[str] = []
        errors: list[str] = []
        limits, cgroup = self.limits, self.grant.cgroup
        if cgroup is not None:
            if oom := cgroup.oom_kills():
                hits.add("memory")
                message = f"memory limit of {limits.memory_mb} MiB exceeded"
                notes.append(f"{message}: the kernel killed {oom} process(es) of the build")
                errors.append(message)
            if forks := cgroup.process_limit_hits():
                hits.add("processes")
                message = f"process limit of {limits.max_processes} reached"
                notes.append(f"{message}: {forks} fork(s) failed")
                errors.append(message)
            if limits.cpu_seconds and cgroup.cpu_seconds() >= limits.cpu_seconds:
                hits.add("cpu")
                errors.append(f"CPU time limit of {limits.cpu_seconds} s exceeded")
        if self._workspace_full or self.grant.workspace.is_full():
            hits.add("workspace")
            message = f"workspace size limit of {limits.workspace_mb} MiB exceeded"
            notes.append(f"{message}: writes failed with 'No space left on device'")
            errors.append(message)
        if self._limit_error:
            hits.add("cpu" if self._limit_error.startswith("CPU") else "workspace")
            notes.append(f"{self._limit_error}: the build was killed")
        return hits, notes, errors[0] if errors else None

    async def stop(self, grace_seconds: float) -> None:
        if self.proc.returncode is not None:
            return
        self._killed = True
        self._terminate()
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._kill_after(grace_seconds))

    async def _kill_after(self, grace: float) -> None:
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            log.info("job ignored SIGTERM for %.1f s; killing it", grace, extra=self.extra)
            await self._kill()

    def _terminate(self) -> None:
        """SIGTERM every process of the build but bubblewrap's own (bwrap
        dies of it at once, and its --die-with-parent would then SIGKILL the
        build before it could clean up)."""
        if not self.sandboxed:
            self._kill_group(signal.SIGTERM)
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.name() != "bwrap":
                    child.send_signal(signal.SIGTERM)

    async def _kill(self) -> None:
        """SIGKILL the build: the outer bwrap (its process group), whose
        death takes the sandbox's pid namespace with it, and every process
        in the build's cgroup."""
        self._kill_group()
        if self.grant.cgroup is not None:
            await asyncio.to_thread(self.grant.cgroup.kill_all)

    def _kill_group(self, sig: signal.Signals = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def _watch_limits(self) -> None:
        """Enforce what the kernel does not: the build's total CPU time
        (cgroup accounting) and, without a workspace filesystem of its own,
        the workspace size. Ends with the job, or when it kills it."""
        limits, cgroup, workspace = self.limits, self.grant.cgroup, self.grant.workspace
        last_walk = time.monotonic()
        while self.proc.returncode is None:
            await asyncio.sleep(WATCH_INTERVAL)
            reason: str | None = None
            if limits.cpu_seconds and cgroup and cgroup.cpu_seconds() > limits.cpu_seconds:
                reason = f"CPU time limit of {limits.cpu_seconds} s exceeded"
            elif limits.workspace_mb and workspace.mounted:
                self._workspace_full = self._workspace_full or workspace.is_full()
            elif limits.workspace_mb and time.monotonic() - last_walk >= TREE_WALK_INTERVAL:
                used = await asyncio.to_thread(workspace.used_bytes)
                last_walk = time.monotonic()
                if used > limits.workspace_mb * _MiB:
                    reason = f"workspace size limit of {limits.workspace_mb} MiB exceeded"
            if reason is not None and self.proc.returncode is None:
                self._limit_error = reason
                log.warning("killing the build: %s", reason, extra=self.extra)
                await self._kill()
                return
