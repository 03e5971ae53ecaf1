"""Log batching: lines leave the runner in numbered batches, in order, once.

A batch is flushed when it holds ``max_lines`` lines or ``max_bytes`` bytes,
or ``interval`` seconds after its first line, whichever comes first. One
batch is in flight at a time; it is resent with the same seq until the
control plane acknowledges it (a resend of a stored batch is acknowledged,
not stored twice). While the control plane is away, batches wait in a
bounded queue; when it is full, ``add`` blocks, which stalls the job's
output pipe instead of dropping lines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from runner.control_client import RPC_RETRY, ControlClient, is_retryable
from runner.metrics import RunnerMetrics

log = logging.getLogger(__name__)

# Longest pause between two sends of a batch the control plane refused for
# lack of disk space (s): a refusal lasts minutes, not milliseconds.
REFUSED_RETRY_CAP = 5.0
REFUSED_RETRY = replace(RPC_RETRY, cap=REFUSED_RETRY_CAP)


def is_refused_for_space(exc: BaseException) -> bool:
    """The control plane refused a batch because its database's disk is
    low (RESOURCE_EXHAUSTED): resend it later, never drop it."""
    # By name: only control_client.py imports grpc in the runner.
    code = getattr(exc, "code", None)
    return callable(code) and getattr(code(), "name", "") == "RESOURCE_EXHAUSTED"


def _details(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    return str(details()) if callable(details) else str(exc)


STREAMS = {"stdout": "o", "stderr": "e", "system": "s"}


class LogBatcher:
    def __init__(
        self,
        client: ControlClient,
        build_id: str,
        token: str,
        metrics: RunnerMetrics,
        *,
        interval: float = 0.05,
        max_lines: int = 5000,
        max_bytes: int = 1024 * 1024,
        max_queued_batches: int = 256,
    ) -> None:
        self.client = client
        self.build_id = build_id
        self.token = token
        self.metrics = metrics
        self.interval = interval
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        # Records "<unix ms>\t<o|e|s>\t<text>", sent packed (one bytes field
        # per batch instead of a message per line: 20x cheaper).
        self._lines: list[str] = []
        self._bytes = 0
        self._seq = 0
        self._queue: asyncio.Queue[tuple[int, list[str], bool] | None] = asyncio.Queue(
            max_queued_batches
        )
        self._timer: asyncio.TimerHandle | None = None
        self._sender = asyncio.create_task(self._send_loop(), name=f"logs-{build_id}")
        self.abandoned = asyncio.Event()
        self.lines_sent = 0

    async def add(self, stream: str, text: str) -> None:
        if self.add_nowait(stream, text):
            await self.flush()

    def add_nowait(self, stream: str, text: str) -> bool:
        """Buffer a line; return True when the batch is full and the caller
        must ``await flush()`` (the hot path of a chatty build avoids an
        await per line)."""
        self._lines.append(f"{int(time.time() * 1000)}\t{STREAMS[stream]}\t{text}")
        self._bytes += len(text)
        if len(self._lines) >= self.max_lines or self._bytes >= self.max_bytes:
            return True
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.interval, self._flush_soon)
        return False

    def _flush_soon(self) -> None:
        self._timer = None
        if not self._lines:
            return
        if self._queue.full():
            # The control plane is behind or away: try again in a moment.
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._flush_soon)
            return
        self._enqueue_nowait(final=False)

    def _enqueue_nowait(self, *, final: bool) -> None:
        self._seq += 1
        self._queue.put_nowait((self._seq, self._lines, final))
        self._lines, self._bytes = [], 0

    async def flush(self, *, final: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines and not final:
            return
        self._seq += 1
        batch, self._lines, self._bytes = self._lines, [], 0
        await self._queue.put((self._seq, batch, final))

    async def close(self) -> None:
        """Send everything left, marking the last batch final, and wait until
        it was acknowledged (or the build was closed by the control plane).
        Callers bound the wait with ``asyncio.timeout`` when they must."""
        await self.flush(final=True)
        await self._queue.put(None)
        await asyncio.shield(self._sender)

    async def abort(self) -> None:
        self._sender.cancel()
        try:
            await self._sender
        except asyncio.CancelledError:
            pass

    async def _send_loop(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            seq, lines, final = item
            if self.abandoned.is_set():
                continue
            attempt = 0
            refused = False
            while True:
                try:
                    packed = "\n".join(lines).encode()
                    await self.client.append(self.token, self.build_id, seq, packed, final)
                except Exception as exc:
                    if is_refused_for_space(exc):
                        # The database's disk is low: keep the batch and
                        # back off longer than for a blip; the queue behind
                        # it fills and then stalls the job's output.
                        if not refused:
                            log.warning(
                                "log batch %d refused, will resend: %s", seq, _details(exc),
                                extra={"build_id": self.build_id},
                            )  # fmt: skip
                        refused = True
                        self.metrics.log_batches_retried.inc()
                        attempt += 1
                        await asyncio.sleep(REFUSED_RETRY.delay(attempt))
                        continue
                    if not is_retryable(exc):
                        # The control plane closed this build (canceled,
                        # timed out, forced): its log is closed too.
                        log.warning(
                            "log batch %d refused: %s", seq, exc, extra={"build_id": self.build_id}
                        )
                        self.abandoned.set()
                        break
                    self.metrics.log_batches_retried.inc()
                    attempt += 1
                    await asyncio.sleep(RPC_RETRY.delay(attempt))
                    continue
                if refused:
                    log.info(
                        "log batch %d accepted after %d refusals", seq, attempt,
                        extra={"build_id": self.build_id},
                    )  # fmt: skip
                self.metrics.log_batches_sent.inc()
                self.lines_sent += len(lines)
                break
