"""Reading Nomad's fs/logs stream: frames, the resume position, lines.

Pure. ``GET /v1/client/fs/logs/:alloc_id`` (developer.hashicorp.com/nomad/
api-docs/client#stream-logs) answers with JSON frames ``{"Offset", "Data",
"File", "FileEvent"}`` (api/fs.go ``StreamFrame``; empty fields are left out
and ``{}`` is a heartbeat), written back to back with nothing between them.

What a frame's ``Offset`` means, from hashicorp/nomad v1.6.0-v1.9.7
client/fs_endpoint.go (``streamFile``) and client/lib/streamframer/framer.go:
each read of the log file is handed to the framer with the file offset just
past it; the framer merges reads into one frame for up to 200 ms (or up to
64 KiB) and keeps the offset of the *first* read merged, and when it splits an
oversized frame it adds the frame size to that offset. So ``Offset`` can lie
before the end of the frame's data (resuming there repeats bytes) or after it
(resuming there skips bytes). ``LogCursor`` therefore ignores it and counts
the data bytes it was given.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_LINE_BYTES = 1 << 20
MAX_UNPARSED_CHARS = 4 << 20


class LogStreamError(ValueError):
    """A log stream did not hold the frames the API documents."""


@dataclass(frozen=True)
class LogFrame:
    """One fs/logs frame that is not a heartbeat. ``file_event`` is Nomad's
    ``FileEvent``: ``"file deleted"`` or ``"file truncated"`` (else empty)."""

    file: str
    data: bytes
    file_event: str = ""


def parse_frame(frame: Mapping[str, Any]) -> LogFrame | None:
    """The frame, or None for a heartbeat or a frame without data or event.
    Raises ``LogStreamError`` when ``Data`` is not base64."""
    data = frame.get("Data") or ""
    event = str(frame.get("FileEvent") or "")
    if not data and not event:
        return None
    try:
        raw = base64.b64decode(data, validate=True) if data else b""
    except (binascii.Error, TypeError) as exc:
        raise LogStreamError(f"a log frame is not base64: {exc}") from None
    return LogFrame(file=str(frame.get("File") or ""), data=raw, file_event=event)


class LogCursor:
    """Where a log stream was read to, as fs/logs's ``offset`` counts it with
    ``origin=start``: bytes from the start of the first log file on disk.

    Within one response Nomad sends each log file from the requested position
    to its end and then the next file from its start (``logsImpl``), so the
    position is where the request started plus every data byte since. The
    caller must ``advance`` once per complete frame, before handing its lines
    on, and never for a frame cut off by a broken stream.
    """

    def __init__(self) -> None:
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    def advance(self, data_bytes: int) -> None:
        self._position += data_bytes


class FrameDecoder:
    """Splits the fs/logs response, a run of JSON objects with or without
    whitespace between them, into frames."""

    def __init__(self) -> None:
        self._text = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._json = json.JSONDecoder()

    @property
    def pending(self) -> bool:
        return bool(self._text.strip())

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """The frames completed by ``chunk``. Raises ``LogStreamError`` when
        the text is not a sequence of JSON objects."""
        text = self._text + self._utf8.decode(chunk)
        frames: list[dict[str, Any]] = []
        position = 0
        while True:
            while position < len(text) and text[position].isspace():
                position += 1
            if position == len(text):
                break
            try:
                frame, position = self._json.raw_decode(text, position)
            except json.JSONDecodeError:
                break  # the rest of this frame is still on its way
            if isinstance(frame, dict):
                frames.append(frame)
        self._text = text[position:]
        if len(self._text) > MAX_UNPARSED_CHARS:
            raise LogStreamError("the log stream is not a sequence of JSON frames")
        return frames


class LineSplitter:
    """Cuts bytes into lines without their newline; a line longer than
    ``MAX_LINE_BYTES`` is cut into pieces of that size."""

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._partial += data
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest)
        out = [bytes(line) for line in lines]
        while len(self._partial) > MAX_LINE_BYTES:
            out.append(bytes(self._partial[:MAX_LINE_BYTES]))
            del self._partial[:MAX_LINE_BYTES]
        return out

    def flush(self) -> bytes | None:
        """The last line when it had no newline."""
        if not self._partial:
            return None
        tail = bytes(self._partial)
        self._partial.clear()
        return tail
