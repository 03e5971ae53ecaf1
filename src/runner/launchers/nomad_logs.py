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
the data bytes it was given, per file.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.errors import ProtocolError
from runner.launchers.lines import LineCutter

MAX_UNPARSED_CHARS = 4 << 20
DELETED = "file deleted"
TRUNCATED = "file truncated"


class LogStreamError(ProtocolError):
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
    """Where one log stream (``<task>.<stdout|stderr>.<n>`` files) was read to.

    ``position`` is what fs/logs's ``offset`` means with ``origin=start``:
    bytes from the start of the oldest log file still on disk. Within one
    response Nomad sends each file from the requested position to its end and
    then the next file from its start (``logsImpl``), so every data byte moves
    the position on by one and the frame's ``File`` says which file it is in.
    When logmon deletes the oldest file (``LogConfig.MaxFiles``), Nomad counts
    from the next one, so before a new request the caller should ``rebase`` on
    a listing of the log directory; without one the bytes counted stand.

    The caller must ``advance`` once per complete frame, before handing its
    lines on, and never for a frame cut off by a broken stream.
    """

    def __init__(self, task: str, stream: str) -> None:
        self._prefix = f"{task}.{stream}."
        self._position = 0
        self._file_index: int | None = None
        self._file_offset = 0
        self._last_event = ""
        self.received = 0  # data bytes ever advanced over: progress

    @property
    def position(self) -> int:
        return self._position

    def advance(self, frame: LogFrame) -> None:
        index = self._index(frame.file.rsplit("/", 1)[-1])
        if index is not None and index != self._file_index:
            self._file_index, self._file_offset = index, 0
        if frame.file_event == TRUNCATED and self._last_event != TRUNCATED:
            # Nomad reads a truncated file again from its start.
            self._position -= self._file_offset
            self._file_offset = 0
        self._last_event = frame.file_event
        size = len(frame.data)
        self._file_offset += size
        self._position += size
        self.received += size

    def rebase(self, listing: Any) -> bool:
        """Set ``position`` from fs/ls's answer for ``alloc/logs`` (a list of
        ``{"Name", "Size", ...}``): the sizes of this stream's files older
        than the current one plus the offset in it. Returns True when files
        not yet read were deleted, so that output was lost; the position is
        then the start of the oldest file left."""
        sizes: dict[int, int] = {}
        for entry in listing if isinstance(listing, list) else []:
            if isinstance(entry, dict) and not entry.get("IsDir"):
                index = self._index(str(entry.get("Name") or ""))
                if index is not None:
                    sizes[index] = int(entry.get("Size") or 0)
        if not sizes:
            return False
        current = 0 if self._file_index is None else self._file_index
        if current in sizes:
            older = sum(size for index, size in sizes.items() if index < current)
            self._position = older + self._file_offset
            return False
        oldest = min(sizes)
        if current < oldest:
            self._file_index, self._file_offset, self._position = oldest, 0, 0
            return True
        return False  # a file newer than the listing: keep counting

    def _index(self, name: str) -> int | None:
        suffix = name.removeprefix(self._prefix)
        return int(suffix) if suffix != name and suffix.isdigit() else None


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


# Nomad's log frames cut lines the same way as the local launcher.
LineSplitter = LineCutter
