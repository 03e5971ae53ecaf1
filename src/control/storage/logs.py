"""Log chunks: one row per runner batch, lines numbered contiguously from 1.

A chunk's ``data`` holds its lines joined by "\\n", each line encoded as
``<unix ms>\\t<stream letter>\\t<text>``; text never holds "\\n" (the runner
splits on it) nor NUL (replaced at ingest), so decoding is a plain split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from psycopg.rows import class_row

from control.errors import FailedPrecondition, InvalidArgument, NotFound
from control.storage.db import Conn, Database, fetch_value

STREAM_CODES = {"stdout": "o", "stderr": "e", "system": "s"}
STREAM_NAMES = {v: k for k, v in STREAM_CODES.items()}
MAX_LINE_BYTES = 64 * 1024
MAX_LOG_BYTES = 100 * 1024 * 1024
CUT_MARKER = " [conveyor: line cut at 65536 bytes]"
# One record of a packed batch starts with "<unix ms>\t<o|e|s>\t".
_RECORD_HEAD = re.compile(r"^\d{1,16}\t[oes]\t", re.MULTILINE)
# Per stored line, on top of its text, in the log-size accounting.
LINE_OVERHEAD = 16


def limit_marker(max_bytes: int) -> str:
    """The system line that ends a log which reached its size limit."""
    size = (
        f"{max_bytes / (1024 * 1024):g} MiB" if max_bytes >= 1024 * 1024 else f"{max_bytes} bytes"
    )
    return f"[conveyor: log limit of {size} reached; further output is dropped]"


@dataclass(frozen=True)
class StoredLine:
    number: int
    time_ms: int
    stream: str
    text: str


@dataclass(frozen=True)
class _LogState:
    """A build's log as its row counts it."""

    log_lines: int
    last_seq: int
    log_bytes: int
    log_closed: bool


class _Chunk(NamedTuple):
    """A stored chunk: packed records numbered from ``first_line``. A tuple,
    as ``read_packed`` hands them out."""

    first_line: int
    data: str


@dataclass(frozen=True)
class AppendResult:
    """What a batch stored: ``count`` lines from ``first_line``, encoded in
    ``data`` (decode them with ``lines()`` only when needed)."""

    last_line: int
    duplicate: bool
    first_line: int = 0
    count: int = 0
    data: str = ""
    bytes: int = 0
    # This batch closed the log (its size limit, or ``close_with``).
    closed: bool = False
    _decoded: list[StoredLine] = field(default_factory=list, compare=False, repr=False)

    def lines(self) -> list[StoredLine]:
        if self.count and not self._decoded:
            self._decoded.extend(decode_chunk(self.first_line, self.data))
        return self._decoded


def encode_lines(lines: list[tuple[int, str, str]]) -> str:
    """Packed form of (unix ms, stream name, text) lines."""
    return "\n".join(f"{ts}\t{STREAM_CODES[stream]}\t{text}" for ts, stream, text in lines)


def check_packed(text: str, max_lines: int) -> int:
    """Return the number of records of a packed batch; raise
    ``InvalidArgument("packed", ...)`` when a record is malformed."""
    if not text:
        return 0
    count = text.count("\n") + 1
    if count > max_lines:
        raise InvalidArgument("packed", f"at most {max_lines} lines per batch")
    if len(_RECORD_HEAD.findall(text)) != count:
        raise InvalidArgument(
            "packed", 'every line must be "<unix ms>\\t<o|e|s>\\t<text>", separated by "\\n"'
        )
    return count


def clean_text(text: str) -> str:
    """Make a line storable: no NUL, no newline, at most MAX_LINE_BYTES."""
    if "\0" in text or "\n" in text:
        text = text.replace("\0", "\ufffd").replace("\n", " ")
    if len(text) > MAX_LINE_BYTES // 4 and len(text.encode()) > MAX_LINE_BYTES:
        text = text.encode()[:MAX_LINE_BYTES].decode(errors="ignore") + CUT_MARKER
    return text


def encode_chunk(lines: list[StoredLine]) -> str:
    return "\n".join(f"{ln.time_ms}\t{STREAM_CODES[ln.stream]}\t{ln.text}" for ln in lines)


def decode_chunk(first_line: int, data: str) -> list[StoredLine]:
    out = []
    for offset, raw in enumerate(data.split("\n")):
        ts, code, text = raw.split("\t", 2)
        out.append(StoredLine(first_line + offset, int(ts), STREAM_NAMES[code], text))
    return out


class LogStore:
    """``max_bytes`` bounds one build's stored log (UTF-8 bytes of its text
    plus a small per-line overhead); past it the log ends with a marker line
    and later batches are acknowledged but dropped, so a runner never loops
    on a refused batch."""

    def __init__(self, db: Database, max_bytes: int = MAX_LOG_BYTES) -> None:
        self.db = db
        self.max_bytes = max_bytes

    async def append(
        self, build_id: str, seq: int, lines: list[tuple[int, str, str]]
    ) -> AppendResult:
        """Store one batch of (unix ms, stream, text) lines exactly once; see
        ``append_packed``."""
        return await self.append_packed(build_id, seq, encode_lines(lines), len(lines))

    async def append_packed(
        self, build_id: str, seq: int, text: str, count: int, *, close_with: str = ""
    ) -> AppendResult:
        """Store one batch of ``count`` packed records (``check_packed``)
        exactly once. With ``close_with`` (a refusal of
        ``control.logs.admission``), store that system line instead of the
        batch and close the log.

        A batch whose ``seq`` is already stored is acknowledged as duplicate.
        Raises ``FailedPrecondition`` for a seq that skips ahead (the runner
        must resend in order) and ``NotFound`` for an unknown build.
        """
        if "\0" in text:
            text = text.replace("\0", "\ufffd")
        size = len(text.encode()) + LINE_OVERHEAD * count if count else 0
        async with self.db.transaction() as conn:
            cur = conn.cursor(row_factory=class_row(_LogState))
            await cur.execute(
                "SELECT log_lines, last_seq, log_bytes, log_closed FROM builds"
                " WHERE id = %s FOR UPDATE",
                (build_id,),
            )
            state = await cur.fetchone()
            if state is None:
                raise NotFound(f"build {build_id!r} not found")
            last_line, last_seq, log_bytes = state.log_lines, state.last_seq, state.log_bytes
            closed = state.log_closed
            if seq <= last_seq:
                return AppendResult(last_line, duplicate=True)
            if seq != last_seq + 1:
                raise FailedPrecondition(
                    f"log batch seq {seq} skips ahead; the next expected is {last_seq + 1}"
                )
            closing = False
            if closed or not count:
                text, count, size = "", 0, 0
            elif close_with:
                time_ms = int(text.split("\t", 1)[0])
                marker = [StoredLine(last_line + 1, time_ms, "system", close_with)]
                text, count, size, closed = encode_chunk(marker), 1, 0, True
                closing = True
            elif log_bytes + size > self.max_bytes or size > count * (MAX_LINE_BYTES // 4):
                # The slow path, line by line: a line may be too long, or the
                # log reaches its limit inside this batch.
                text, count, size, closing = self._line_by_line(
                    decode_chunk(last_line + 1, text), log_bytes
                )
                closed = closing
            if count:
                await conn.execute(
                    "INSERT INTO log_chunks (build_id, first_line, line_count, seq, data)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (build_id, last_line + 1, count, seq, text),
                )
            await conn.execute(
                "UPDATE builds SET log_lines = %s, last_seq = %s, log_bytes = log_bytes + %s,"
                " log_closed = %s WHERE id = %s",
                (last_line + count, seq, size, closed, build_id),
            )
            if count:
                await conn.execute("SELECT pg_notify('conveyor_logs', %s)", (build_id,))
        return AppendResult(
            last_line + count,
            False,
            first_line=last_line + 1,
            count=count,
            data=text,
            bytes=size,
            closed=closing,
        )

    def _line_by_line(self, lines: list[StoredLine], log_bytes: int) -> tuple[str, int, int, bool]:
        """Cut long lines and stop at the log limit; return (data, count,
        bytes, closed)."""
        stored: list[StoredLine] = []
        size = 0
        closed = False
        for line in lines:
            text = clean_text(line.text)
            line_size = len(text.encode()) + LINE_OVERHEAD
            if log_bytes + size + line_size > self.max_bytes:
                marker = limit_marker(self.max_bytes)
                stored.append(StoredLine(line.number, line.time_ms, "system", marker))
                closed = True
                break
            size += line_size
            stored.append(StoredLine(line.number, line.time_ms, line.stream, text))
        return encode_chunk(stored), len(stored), size, closed

    async def read(self, build_id: str, after: int, limit: int = 5000) -> list[StoredLine]:
        """Return up to about ``limit`` lines numbered > ``after``, in order."""
        async with self.db.connection() as conn:
            return await self.read_in(conn, build_id, after, limit)

    async def read_in(self, conn: Conn, build_id: str, after: int, limit: int) -> list[StoredLine]:
        out: list[StoredLine] = []
        for first_line, data in await self._chunks(conn, build_id, after, limit):
            out.extend(ln for ln in decode_chunk(first_line, data) if ln.number > after)
        return out

    async def read_packed(self, build_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        """Stored chunks holding the lines after ``after`` (about ``limit``
        lines) as (first line number, packed records), the first one cut to
        start right after ``after``. No per-line work for whole chunks."""
        async with self.db.connection() as conn:
            chunks: list[tuple[int, str]] = list(await self._chunks(conn, build_id, after, limit))
        if chunks and chunks[0][0] <= after:
            first_line, data = chunks[0]
            records = data.split("\n")[after + 1 - first_line :]
            if records:
                chunks[0] = (after + 1, "\n".join(records))
            else:
                chunks.pop(0)
        return chunks

    async def _chunks(self, conn: Conn, build_id: str, after: int, limit: int) -> list[_Chunk]:
        # Only chunks that start within the next ``limit`` lines: a long log
        # is read page by page, never whole.
        cur = conn.cursor(row_factory=class_row(_Chunk))
        await cur.execute(
            "SELECT first_line, data FROM log_chunks WHERE build_id = %s"
            " AND first_line + line_count > %s AND first_line <= %s ORDER BY first_line",
            (build_id, after + 1, after + limit),
        )
        return await cur.fetchall()

    async def last_line(self, build_id: str) -> int:
        async with self.db.connection() as conn:
            lines: int | None = await fetch_value(
                conn, "SELECT log_lines FROM builds WHERE id = %s", (build_id,)
            )
        if lines is None:
            raise NotFound(f"build {build_id!r} not found")
        return lines

    async def account_of(self, build_id: str) -> str:
        """The account that owns a build, "" for an unknown build."""
        async with self.db.connection() as conn:
            account_id: str | None = await fetch_value(
                conn, "SELECT account_id::text FROM builds WHERE id = %s", (build_id,)
            )
        return account_id or ""

    async def account_log_bytes(self, account_id: str) -> int:
        """Log bytes the account's builds keep stored (the quota's measure:
        text plus ``LINE_OVERHEAD`` per line, as ``builds.log_bytes``)."""
        async with self.db.connection() as conn:
            # builds_project makes this one index scan per project.
            stored: int = await fetch_value(
                conn,
                "SELECT coalesce(sum(b.log_bytes), 0)::bigint FROM projects p"
                " JOIN builds b ON b.project_id = p.id WHERE p.account_id = %s",
                (account_id,),
            )
        return stored

    async def database_size(self) -> int:
        """``pg_database_size`` of the current database, in bytes."""
        async with self.db.connection() as conn:
            size: int = await fetch_value(conn, "SELECT pg_database_size(current_database())")
        return size
