"""Log chunks: one row per runner batch, lines numbered contiguously from 1.

A chunk's ``data`` holds its lines joined by "\\n", each line encoded as
``<unix ms>\\t<stream letter>\\t<text>``; text never holds "\\n" (the runner
splits on it) nor NUL (replaced at ingest), so decoding is a plain split.
"""

from __future__ import annotations

from dataclasses import dataclass

from control.errors import FailedPrecondition, NotFound
from control.storage.db import Conn, Database

STREAM_CODES = {"stdout": "o", "stderr": "e", "system": "s"}
STREAM_NAMES = {v: k for k, v in STREAM_CODES.items()}
MAX_LINE_BYTES = 64 * 1024
MAX_LOG_BYTES = 100 * 1024 * 1024
CUT_MARKER = " [conveyor: line cut at 65536 bytes]"


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
class AppendResult:
    last_line: int
    duplicate: bool
    lines: tuple[StoredLine, ...] = ()
    bytes: int = 0


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
        """Store one batch of (unix ms, stream, text) lines exactly once.

        A batch whose ``seq`` is already stored is acknowledged as duplicate.
        Raises ``FailedPrecondition`` for a seq that skips ahead (the runner
        must resend in order) and ``NotFound`` for an unknown build.
        """
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "SELECT log_lines, last_seq, log_bytes, log_closed FROM builds"
                " WHERE id = %s FOR UPDATE",
                (build_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"build {build_id!r} not found")
            last_line, last_seq, log_bytes, closed = int(row[0]), int(row[1]), int(row[2]), row[3]
            if seq <= last_seq:
                return AppendResult(last_line, duplicate=True)
            if seq != last_seq + 1:
                raise FailedPrecondition(
                    f"log batch seq {seq} skips ahead; the next expected is {last_seq + 1}"
                )
            stored: list[StoredLine] = []
            size = 0
            if not closed:
                for time_ms, stream, text in lines:
                    text = clean_text(text)
                    line_size = len(text.encode()) + 16
                    if log_bytes + size + line_size > self.max_bytes:
                        marker = limit_marker(self.max_bytes)
                        stored.append(
                            StoredLine(last_line + len(stored) + 1, time_ms, "system", marker)
                        )
                        closed = True
                        break
                    size += line_size
                    stored.append(StoredLine(last_line + len(stored) + 1, time_ms, stream, text))
            if stored:
                await conn.execute(
                    "INSERT INTO log_chunks (build_id, first_line, line_count, seq, data)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (build_id, last_line + 1, len(stored), seq, encode_chunk(stored)),
                )
            new_last = last_line + len(stored)
            await conn.execute(
                "UPDATE builds SET log_lines = %s, last_seq = %s, log_bytes = log_bytes + %s,"
                " log_closed = %s WHERE id = %s",
                (new_last, seq, size, closed, build_id),
            )
            if stored:
                await conn.execute("SELECT pg_notify('conveyor_logs', %s)", (build_id,))
        return AppendResult(new_last, duplicate=False, lines=tuple(stored), bytes=size)

    async def read(self, build_id: str, after: int, limit: int = 5000) -> list[StoredLine]:
        """Return up to about ``limit`` lines numbered > ``after``, in order."""
        async with self.db.connection() as conn:
            return await self.read_in(conn, build_id, after, limit)

    async def read_in(self, conn: Conn, build_id: str, after: int, limit: int) -> list[StoredLine]:
        cur = await conn.execute(
            "SELECT first_line, data FROM log_chunks WHERE build_id = %s"
            " AND first_line + line_count > %s ORDER BY first_line",
            (build_id, after + 1),
        )
        out: list[StoredLine] = []
        while len(out) < limit:
            rows = await cur.fetchmany(16)
            if not rows:
                break
            for first_line, data in rows:
                out.extend(ln for ln in decode_chunk(int(first_line), data) if ln.number > after)
        return out

    async def last_line(self, build_id: str) -> int:
        async with self.db.connection() as conn:
            cur = await conn.execute("SELECT log_lines FROM builds WHERE id = %s", (build_id,))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"build {build_id!r} not found")
        return int(row[0])
