"""The build cache of one build, on the runner's side.

``CacheRun`` owns the runner's ends of the two pipes the build script talks
through (``runner.script`` describes the script's side, ``runner.cache``
where archives live). On the script's ``cache-restore`` marker it finds the
archive for the key and streams it down the job's fd 7; on ``cache-save``
it reads the archive the script streams up fd 8 into a staging file of its
own, never more than the entry limit; once the build has succeeded,
``finish`` stores it. The runner never opens a file of the build's, so a
symlink or a hard link in a workspace cannot make it read the host.

A cache problem never fails a build: every error ends as a log line and a
metric, and the build goes on without the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common.tasks import cancel_and_wait
from runner.cache import BuildCache, Found, human_size
from runner.metrics import RunnerMetrics
from runner.pipes import close_fd
from runner.script import CachePlan, Marker

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# Bounds on each part: finding and streaming an archive, receiving one,
# storing one. The script itself gives up on an answer after
# ``runner.script.RESTORE_ANSWER_TIMEOUT``.
RESTORE_TIMEOUT = 600.0
RECEIVE_TIMEOUT = 600.0
STORE_TIMEOUT = 600.0
# After the job ended its write end is closed: the rest arrives at once.
DRAIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class CacheTarget:
    """Which archives a build may read and where it writes."""

    project_id: str
    generation: int
    scope: str


class CachePipes:
    """Two pipes: the runner writes what the job reads as its fd 7, and
    reads what the job writes to its fd 8. Descriptors are closed once."""

    def __init__(self) -> None:
        self.job_reads, self.runner_writes = os.pipe()
        self.runner_reads, self.job_writes = os.pipe()

    @property
    def job_fds(self) -> tuple[int, int]:
        return (self.job_reads, self.job_writes)

    def close_job_ends(self) -> None:
        """After the launch: the job holds its own copies now, and the
        runner's would keep the pipes from ever reporting their end."""
        self.job_reads = close_fd(self.job_reads)
        self.job_writes = close_fd(self.job_writes)

    def take_writer(self) -> IO[bytes]:
        fd, self.runner_writes = self.runner_writes, -1
        return os.fdopen(fd, "wb", buffering=0)

    def take_reader(self) -> IO[bytes]:
        fd, self.runner_reads = self.runner_reads, -1
        return os.fdopen(fd, "rb", buffering=0)

    def close(self) -> None:
        self.close_job_ends()
        self.runner_writes = close_fd(self.runner_writes)
        self.runner_reads = close_fd(self.runner_reads)


class CacheRun:
    """The cache side of one build. Feed it the script's cache markers in
    order (``on_marker``), then call ``finish`` once the job has ended;
    ``finish`` releases everything, also when the build failed."""

    def __init__(
        self,
        cache: BuildCache,
        plan: CachePlan,
        target: CacheTarget,
        *,
        staging_dir: Path,
        build_id: str,
        say: Callable[[str], Awaitable[None]],
        metrics: RunnerMetrics,
    ) -> None:
        self.cache = cache
        self.plan = plan
        self.target = target
        self.say = say
        self.metrics = metrics
        self.pipes = CachePipes()
        self.staged = staging_dir / f"{build_id}.tar.gz"
        self.key: str | None = None
        self.found: Found | None = None
        self.restore_error: str | None = None
        self.restored_bytes = 0
        self.received_bytes = 0
        self.too_big = False
        self.save_exit: int | None = None
        self._restore: asyncio.Task[None] | None = None
        self._receive: asyncio.Task[None] | None = None
        self._began = 0.0
        self._save_began = 0.0

    async def on_marker(self, marker: Marker) -> None:
        """Act on one ``cache-*`` marker of the script's."""
        if marker.kind == "cache-restore" and self._restore is None:
            self.key = None if marker.value == "none" else marker.value
            self._began = time.monotonic()
            self._restore = asyncio.create_task(self._answer(self.key), name="cache-restore")
        elif marker.kind == "cache-restored" and self._restore is not None:
            # wait(), not await: the task's own end (bounded inside) without
            # swallowing a cancellation of the build itself.
            await asyncio.wait({self._restore})
            await self._report_restore(marker.exit_code or 0)
        elif marker.kind == "cache-save" and self._receive is None:
            if not marker.exit_code:
                self.metrics.cache_saves.labels("skipped").inc()
                await self.say(
                    "cache: none of the cache paths exists after the build; nothing saved"
                )
                return
            self._save_began = time.monotonic()
            self._receive = asyncio.create_task(self._take(), name="cache-receive")
        elif marker.kind == "cache-saved":
            self.save_exit = marker.exit_code

    async def _answer(self, key: str | None) -> None:
        """Tell the script what to unpack and stream it the archive. The
        script reads an answer line, then the archive up to the end."""
        writer = await _pipe_writer(self.pipes.take_writer())
        try:
            async with asyncio.timeout(RESTORE_TIMEOUT):
                if key is not None:
                    self.found = await asyncio.to_thread(
                        self.cache.find,
                        self.target.project_id, self.target.generation, key, self.target.scope,
                    )  # fmt: skip
                found = self.found
                opened = (
                    await asyncio.to_thread(self.cache.store.open_read, found.name)
                    if found is not None
                    else None
                )
                if found is None or opened is None:
                    self.found = None
                    writer.write(b"miss\n")
                    await writer.drain()
                    return
                handle, _size = opened
                try:
                    writer.write(b"exact\n" if found.exact else b"fallback\n")
                    while chunk := await asyncio.to_thread(handle.read, CHUNK):
                        writer.write(chunk)
                        await writer.drain()
                        self.restored_bytes += len(chunk)
                finally:
                    handle.close()
        except TimeoutError:
            self.restore_error = f"took over {RESTORE_TIMEOUT:.0f} s"
        except (BrokenPipeError, ConnectionResetError):
            self.restore_error = "the build stopped reading it"
        except Exception as exc:  # the store's errors (botocore's are not OSError)
            self.restore_error = str(exc) or type(exc).__name__
            log.warning("cache restore failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), DRAIN_TIMEOUT)

    async def _report_restore(self, tar_exit: int) -> None:
        took = time.monotonic() - self._began
        self.metrics.cache_seconds.labels("restore").observe(took)
        self.metrics.cache_bytes.labels("restore").inc(self.restored_bytes)
        found = self.found
        if self.key is None:
            names = ", ".join(self.plan.lockfiles)
            result = "miss"
            text = (
                f"cache: no lock file ({names}) in the root directory, or no cache path"
                " outside the repository; no cache"
            )
        elif self.restore_error is not None or (found is not None and tar_exit != 0):
            # A tar that failed stops reading: its exit code says more than
            # the broken pipe the runner saw.
            why = (
                f"unpacking it failed (tar exited with {tar_exit})"
                if found is not None and tar_exit != 0
                else self.restore_error
            )
            result = "error"
            text = f"cache: could not restore ({why}); the build goes on without it"
        elif found is None:
            result = "miss"
            text = (
                f"cache: nothing saved yet for key {self.key[:16]};"
                " it is saved if the build succeeds"
            )
        else:
            where = "production" if found.scope == "production" else "this branch"
            size = f"{human_size(self.restored_bytes)} in {took:.2f} s"
            if found.exact:
                result, text = "exact", f"cache restored: key {found.key[:16]} ({where}), {size}"
            else:
                result = "fallback"
                text = (
                    f"cache restored: the newest of {where} (key {found.key[:16]}), {size};"
                    f" the lock files changed, so key {self.key[:16]} is saved"
                    " if the build succeeds"
                )
        self.metrics.cache_restores.labels(result).inc()
        log.info("%s", text)
        await self.say(text)

    async def _take(self) -> None:
        """Read the archive the script streams into the staging file; stop
        at the entry limit (the script's tar then fails: nothing is saved)."""
        limit = self.cache.policy.max_entry_bytes
        reader, transport = await _pipe_reader(self.pipes.take_reader())
        try:
            self.staged.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self.staged.open("wb") as out:
                async with asyncio.timeout(RECEIVE_TIMEOUT):
                    while chunk := await reader.read(CHUNK):
                        self.received_bytes += len(chunk)
                        if self.received_bytes > limit:
                            self.too_big = True
                            return
                        out.write(chunk)
        finally:
            # Closing tells a script still writing (EPIPE) to give up.
            transport.close()

    async def finish(self, succeeded: bool, budget: float = STORE_TIMEOUT) -> None:
        """Store the archive the build made, if it succeeded and made one
        whole, within ``budget`` seconds; then release the pipes and the
        staging file. Never raises (but for cancellation)."""
        try:
            if self._restore is not None:
                await cancel_and_wait(self._restore)
            if self._receive is not None:
                await self._save(succeeded, min(budget, STORE_TIMEOUT))
        finally:
            self.close()
            await cancel_and_wait(*(t for t in (self._restore, self._receive) if t is not None))

    async def _save(self, succeeded: bool, budget: float) -> None:
        assert self._receive is not None
        error: str | None = None
        try:
            await asyncio.wait_for(self._receive, DRAIN_TIMEOUT)
        except TimeoutError:
            error = f"receiving the archive took over {RECEIVE_TIMEOUT:.0f} s"
        except Exception as exc:
            error = f"receiving the archive failed: {exc}"
        limit = self.cache.policy.max_entry_bytes
        if self.too_big:
            result, text = (
                "too_big",
                f"cache not saved: the archive is over the {human_size(limit)} limit",
            )
        elif error is not None:
            result, text = "error", f"cache not saved: {error}"
        elif self.save_exit != 0:
            how = "did not finish" if self.save_exit is None else f"exited with {self.save_exit}"
            result, text = "error", f"cache not saved: making the archive {how}"
        elif not succeeded or self.key is None:
            result, text = "skipped", "cache not saved: the build did not succeed"
        elif budget <= 0:
            result, text = "skipped", "cache not saved: the build's run deadline is too near"
        else:
            try:
                note = await asyncio.wait_for(
                    asyncio.to_thread(
                        self.cache.save,
                        self.target.project_id, self.target.generation, self.key,
                        self.target.scope, self.staged,
                    ),
                    budget,
                )  # fmt: skip
            except Exception as exc:  # the store's errors (botocore's are not OSError)
                result, text = "error", f"cache not saved: the store failed ({exc})"
            else:
                saved = note.startswith("cache saved")
                result = "saved" if saved else "too_big"
                took = time.monotonic() - self._save_began
                text = f"{note} in {took:.2f} s" if saved else note
                self.metrics.cache_seconds.labels("save").observe(took)
                self.metrics.cache_bytes.labels("save").inc(self.received_bytes)
        self.metrics.cache_saves.labels(result).inc()
        log.info("%s", text)
        await self.say(text)

    def close(self) -> None:
        for task in (self._restore, self._receive):
            if task is not None and not task.done():
                task.cancel()
        self.pipes.close()
        with contextlib.suppress(FileNotFoundError):
            self.staged.unlink()


async def _pipe_writer(pipe: IO[bytes]) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def _pipe_reader(pipe: IO[bytes]) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader, transport
