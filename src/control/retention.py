"""Data retention: the loop that deletes builds, logs, webhook deliveries,
skipped pushes and audit rows older than their settings allow.

Every replica runs the loop; a pass runs only in the replica that holds a
session-level advisory lock, on a connection of its own (closing it releases
the lock, however the pass ends). A pass walks the builds older than the
cutoff in windows of ``builds_per_batch``, deletes the log chunks of those
that may go ``rows_per_batch`` rows per statement, then the build rows, then
the other tables in batches of the same size. Each statement commits on its
own and a short pause follows it, so collection never holds locks for long
and leaves the database to ingest (see ``storage/retention.py`` for which
builds may go).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

import psycopg

from common.tasks import cancel_and_wait
from control.config import RetentionSettings
from control.metrics import RetentionMetrics
from control.storage import retention as sql
from control.storage.db import Conn

log = logging.getLogger(__name__)

# The first pass follows a start by at most this much (s), so a replica
# that restarts often still collects.
FIRST_PASS_AFTER = 60.0
STATEMENT_TIMEOUT_MS = 60_000
LOCK_TIMEOUT_MS = 2_000
# Adds what one statement deleted from a table to the pass's totals.
_Count = Callable[[str, sql.Deleted], None]


class Retention:
    """Owns the collection task. ``start`` starts it; ``stop`` cancels and
    awaits it. ``run_pass`` runs one pass now (tests, and the loop)."""

    def __init__(
        self, database_url: str, settings: RetentionSettings, metrics: RetentionMetrics
    ) -> None:
        self.database_url = database_url
        self.settings = settings
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="retention")

    async def stop(self) -> None:
        if self._task is None:
            return
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        wait = min(self.settings.interval, FIRST_PASS_AFTER)
        while True:
            await asyncio.sleep(wait)
            wait = self.settings.interval
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: S110  # run_pass counted and logged it; the next pass retries
                pass

    async def run_pass(self) -> dict[str, sql.Deleted] | None:
        """Run one pass; return what it deleted per table, or ``None`` when
        another replica holds the collection lock. Raises what failed
        (psycopg errors, a statement timeout) after counting an ``error``
        pass and logging it."""
        began = time.monotonic()
        try:
            conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        except Exception:
            self.metrics.passes.labels("error").inc()
            log.exception("retention pass failed: cannot connect to the database")
            raise
        try:
            if not await sql.try_lock(conn):
                self.metrics.passes.labels("skipped").inc()
                log.info("retention pass skipped: another replica is collecting")
                return None
            await sql.bound_session(conn, STATEMENT_TIMEOUT_MS, LOCK_TIMEOUT_MS)
            totals = await self._collect(conn)
            for table, size in (await sql.table_bytes(conn)).items():
                self.metrics.table_bytes.labels(table).set(size)
        except Exception:
            self.metrics.passes.labels("error").inc()
            log.exception("retention pass failed")
            raise
        finally:
            # Closing the session releases the lock, also after a failure
            # or a cancellation in the middle of a batch.
            await conn.close()
        elapsed = time.monotonic() - began
        self.metrics.passes.labels("ok").inc()
        self.metrics.pass_seconds.observe(elapsed)
        self.metrics.last_success.set(time.time())
        log.info(
            "retention pass done in %.1f s: %s",
            elapsed,
            ", ".join(f"{t} {d.rows} rows ({d.bytes} bytes)" for t, d in totals.items())
            or "nothing to delete",
        )
        return totals

    async def _collect(self, conn: Conn) -> dict[str, sql.Deleted]:
        s = self.settings
        now = await sql.database_now(conn)
        rows: Counter[str] = Counter()
        sizes: Counter[str] = Counter()

        def count(table: str, deleted: sql.Deleted) -> None:
            rows[table] += deleted.rows
            sizes[table] += deleted.bytes
            self.metrics.rows_deleted.labels(table).inc(deleted.rows)
            self.metrics.bytes_deleted.labels(table).inc(deleted.bytes)

        if s.build_days:
            cutoff = now - timedelta(days=s.build_days)
            await self._builds(conn, cutoff, count)
            await self._older(conn, "skipped_pushes", cutoff, count)
        if s.delivery_days:
            await self._older(
                conn, "webhook_deliveries", now - timedelta(days=s.delivery_days), count
            )
        if s.audit_days:
            await self._older(conn, "audit_log", now - timedelta(days=s.audit_days), count)
        return {t: sql.Deleted(rows[t], sizes[t]) for t in rows if rows[t]}

    async def _builds(self, conn: Conn, cutoff: datetime, count: _Count) -> None:
        s = self.settings
        start: tuple[datetime, str] | None = sql.START
        while start is not None:
            window = await sql.old_builds(
                conn, cutoff, s.keep_per_branch, start, s.builds_per_batch
            )
            start = window.next_start
            if not window.deletable:
                continue
            # Chunks first, a bounded number per statement: a build with a
            # million lines never becomes one statement deleting them all.
            while True:
                chunks = await sql.delete_log_chunks(conn, window.deletable, s.rows_per_batch)
                count("log_chunks", chunks)
                await asyncio.sleep(s.pause)
                if chunks.rows < s.rows_per_batch:
                    break
            count("builds", await sql.delete_builds(conn, window.deletable))
            await asyncio.sleep(s.pause)

    async def _older(self, conn: Conn, table: str, cutoff: datetime, count: _Count) -> None:
        s = self.settings
        while True:
            deleted = await sql.delete_older(conn, table, cutoff, s.rows_per_batch)
            count(table, deleted)
            await asyncio.sleep(s.pause)
            if deleted.rows < s.rows_per_batch:
                return
