"""Whether a runner's log batch is stored: the one place that decides.

Two things refuse a batch:

* **the database's disk is low** (free space below ``min_free_bytes``). The
  batch is refused with ``ResourceExhausted`` (gRPC RESOURCE_EXHAUSTED)
  before the database is touched. The runner keeps it, backs off and sends
  it again, so no line is lost and no build fails: a build's output stalls
  once its runner's buffer is full, and everything flows again once space
  returns. Log bytes are the bulk of what Conveyor writes, so refusing them
  keeps PostgreSQL itself from running out of space;
* **the build's account keeps more log bytes than its quota**. The batch is
  stored as one system line naming the quota, the build's log is closed
  (later batches are acknowledged and dropped, so the runner never loops on
  them) and the build carries a warning saying why its log ends there.

Free space is sampled every ``DiskSettings.interval`` seconds; between two
samples each stored byte counts ``AMPLIFICATION`` times against it, so a
fast build cannot run far past the watermark. An account's usage is read
from PostgreSQL at most every ``USAGE_REFRESH`` seconds and counted up in
memory in between: the quota holds within what the account's builds write
in that time (per replica).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

from common.tasks import cancel_and_wait
from control.config import DiskSettings
from control.errors import ResourceExhausted
from control.metrics import DiskMetrics
from control.storage.logs import LogStore

log = logging.getLogger(__name__)

# Disk bytes per stored log byte: the heap or TOAST row plus its WAL. In
# issue 15, 80 MiB of random output grew the database by 214 MB (2.7x).
AMPLIFICATION = 3
# How often an account's stored log bytes are read again (s).
USAGE_REFRESH = 30.0
# Builds whose account is remembered (ids never change owner).
_ACCOUNT_CACHE = 10_000


def human_size(size: int) -> str:
    """``1 GiB``, ``64 MiB``, ``900 KiB`` or ``512 bytes``."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def quota_marker(quota: int) -> str:
    """The system line that ends a log when its account's quota is used up."""
    return (
        f"[conveyor: the account's log storage quota of {human_size(quota)} is used up;"
        " further output is dropped]"
    )


def quota_warning(quota: int) -> str:
    """The build's warning when its log was cut by the account's quota."""
    return (
        f"log cut: the account's log storage quota of {human_size(quota)} is used up"
        " (old builds free it as they are deleted)"
    )


class DiskProbe(Protocol):
    """Measures the free space of the database's disk."""

    name: str

    async def free_bytes(self) -> int:
        """Free bytes now; raises ``OSError`` or the database's errors."""
        ...


class StatvfsProbe:
    """statvfs of a directory on the database's filesystem (the embedded
    server's data directory). Counts the space an unprivileged user may
    take (``f_bavail``), which is what PostgreSQL gets."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"statvfs of {path}"

    async def free_bytes(self) -> int:
        st = await asyncio.to_thread(os.statvfs, self.path)
        return st.f_bavail * st.f_frsize


class DatabaseBudgetProbe:
    """An external server whose disk this process cannot see: the operator
    gives the database a budget, and free space is that budget minus
    ``pg_database_size`` (which counts tables and indexes, not WAL)."""

    def __init__(self, logs: LogStore, budget: int) -> None:
        self.logs = logs
        self.budget = budget
        self.name = f"database size against a budget of {human_size(budget)}"

    async def free_bytes(self) -> int:
        return self.budget - await self.logs.database_size()


@dataclass(frozen=True)
class DiskState:
    """The last check. ``free_bytes`` is None when nothing is measured (no
    probe configured, or the check failed: then ``error`` says why)."""

    free_bytes: int | None
    min_free_bytes: int
    low: bool
    probes: tuple[str, ...]
    error: str = ""

    def reason(self) -> str:
        """The sentence a refused runner and ``/readyz`` show."""
        return (
            f"the database's disk is low ({human_size(max(self.free_bytes or 0, 0))} free,"
            f" the watermark is {human_size(self.min_free_bytes)}): log batches are"
            " refused until space is freed; runners keep them and send them again"
        )


@dataclass(frozen=True)
class Verdict:
    """A batch may be stored. ``close_with`` is empty, or the marker line
    to store instead of the batch, closing the build's log."""

    account_id: str
    close_with: str = ""
    warning: str = ""


class LogAdmission:
    """Call ``start`` once (it measures before returning), ``admit`` before
    storing each batch and ``stored`` after, ``stop`` at shutdown."""

    def __init__(
        self,
        logs: LogStore,
        settings: DiskSettings,
        metrics: DiskMetrics,
        probes: list[DiskProbe] | None = None,
    ) -> None:
        self.logs = logs
        self.settings = settings
        self.metrics = metrics
        if probes is None:
            probes = []
            if settings.path:
                probes.append(StatvfsProbe(settings.path))
            if settings.budget_bytes:
                probes.append(DatabaseBudgetProbe(logs, settings.budget_bytes))
        self.probes = probes
        self.state = DiskState(None, settings.min_free_bytes, False, self._names())
        # Bytes stored since the last measurement.
        self._since_check = 0
        self._accounts: dict[str, str] = {}
        self._usage: dict[str, tuple[float, int]] = {}
        self._task: asyncio.Task[None] | None = None
        metrics.min_free_bytes.set(settings.min_free_bytes if probes else 0)

    def _names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.probes)

    async def start(self) -> None:
        await self.check()
        if self.probes:
            self._task = asyncio.create_task(self._loop(), name="disk-watermark")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            await self.check()

    async def check(self) -> DiskState:
        """Measure every probe now (bounded by the check interval, at least
        5 s) and update the state; never raises but ``CancelledError``."""
        if not self.probes:
            return self.state
        since = self._since_check
        try:
            async with asyncio.timeout(max(self.settings.interval, 5.0)):
                free = min([await probe.free_bytes() for probe in self.probes])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Fail open: a check that cannot measure refuses nothing (a
            # database that is away refuses the batch by itself).
            message = str(exc) or type(exc).__name__
            if not self.state.error:
                log.warning("disk watermark: cannot measure free space: %s", message)
            self.metrics.checks.labels(result="error").inc()
            self._set(DiskState(None, self.settings.min_free_bytes, False, self._names(), message))
            return self.state
        self.metrics.checks.labels(result="ok").inc()
        self._since_check -= since
        self.metrics.free_bytes.set(free)
        low = free < self.settings.min_free_bytes
        self._set(DiskState(free, self.settings.min_free_bytes, low, self._names()))
        return self.state

    def _set(self, state: DiskState) -> None:
        was_low, self.state = self.state.low, state
        self.metrics.low.set(1 if state.low else 0)
        if state.low and not was_low:
            log.error("disk watermark reached: %s", state.reason())
        elif was_low and not state.low:
            log.warning(
                "disk watermark cleared: %s free; log batches are accepted again",
                human_size(state.free_bytes or 0),
            )

    async def admit(self, build_id: str, size: int) -> Verdict:
        """Decide whether a batch of ``size`` bytes for ``build_id`` is stored.

        Raises ``ResourceExhausted`` while the database's disk is low (the
        runner must resend the batch later). Returns a ``Verdict`` whose
        ``close_with`` is set when the account's quota is used up: the
        caller stores that line instead and closes the log. Raises the
        database's errors (``Unavailable``) unchanged."""
        state = self.state
        if state.free_bytes is not None and not state.low:
            estimate = state.free_bytes - AMPLIFICATION * self._since_check
            if estimate < state.min_free_bytes:
                self._set(
                    DiskState(estimate, state.min_free_bytes, True, state.probes, state.error)
                )
        if self.state.low:
            self.metrics.batches_refused.labels(reason="disk_low").inc()
            raise ResourceExhausted(self.state.reason())
        quota = self.settings.account_log_quota_bytes
        if not quota:
            return Verdict("")
        account_id = await self._account(build_id)
        if account_id and await self._used(account_id) >= quota:
            self.metrics.batches_refused.labels(reason="quota").inc()
            return Verdict(account_id, quota_marker(quota), quota_warning(quota))
        return Verdict(account_id)

    def stored(self, verdict: Verdict, size: int) -> None:
        """Count ``size`` bytes a batch admitted by ``verdict`` stored."""
        self._since_check += size
        if verdict.account_id in self._usage:
            at, used = self._usage[verdict.account_id]
            self._usage[verdict.account_id] = (at, used + size)

    async def _account(self, build_id: str) -> str:
        account_id = self._accounts.get(build_id)
        if account_id is None:
            account_id = await self.logs.account_of(build_id)
            if not account_id:
                return ""  # storing raises NotFound
            if len(self._accounts) >= _ACCOUNT_CACHE:
                self._accounts.clear()
            self._accounts[build_id] = account_id
        return account_id

    async def _used(self, account_id: str) -> int:
        cached = self._usage.get(account_id)
        if cached is not None and time.monotonic() - cached[0] < USAGE_REFRESH:
            return cached[1]
        used = await self.logs.account_log_bytes(account_id)
        self._usage[account_id] = (time.monotonic(), used)
        return used

    def readiness(self) -> dict[str, object]:
        """The disk part of ``/readyz`` (when a probe is configured)."""
        s = self.state
        out: dict[str, object] = {
            "free_bytes": s.free_bytes,
            "min_free_bytes": s.min_free_bytes,
            "accepting_logs": not s.low,
            "measured_by": list(s.probes),
        }
        if s.error:
            out["error"] = s.error
        return out
