"""Cutting a job's output into log lines, the same way for every launcher.

A line longer than ``MAX_LINE_BYTES`` keeps its first ``MAX_LINE_BYTES``
bytes (backed off to a UTF-8 character boundary) followed by ``CUT_MARKER``,
and the rest of it, up to its newline, is dropped: one log line tells the
reader it was cut, where splitting it into many lines would not, and a
secret in the dropped part never reaches the log in pieces the masker cannot
recognise. The control plane cuts to the same length with the same marker
(``control.storage.logs``), so a line is never cut twice.
"""

from __future__ import annotations

MAX_LINE_BYTES = 64 * 1024
CUT_MARKER = b" [conveyor: line cut at 65536 bytes]"


def _cut(line: bytes) -> bytes:
    """The first ``MAX_LINE_BYTES`` of ``line``, not ending inside a UTF-8
    character, with the marker."""
    end = MAX_LINE_BYTES
    # Back off over continuation bytes (10xxxxxx) to the character's start.
    while end > MAX_LINE_BYTES - 4 and line[end] & 0xC0 == 0x80:
        end -= 1
    return line[:end] + CUT_MARKER


class LineCutter:
    """Bytes in, lines out (without their newline). Holds at most
    ``MAX_LINE_BYTES`` of an unfinished line, whatever the job writes."""

    def __init__(self) -> None:
        self._partial = b""
        # Inside a line that was cut: drop bytes up to its newline.
        self._dropping = False

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes (a cut line as soon as it is cut)."""
        out: list[bytes] = []
        if self._dropping:
            newline = data.find(b"\n")
            if newline < 0:
                return out
            data = data[newline + 1 :]
            self._dropping = False
        *lines, rest = (self._partial + data).split(b"\n")
        out.extend(_cut(line) if len(line) > MAX_LINE_BYTES else line for line in lines)
        if len(rest) > MAX_LINE_BYTES:
            out.append(_cut(rest))
            rest = b""
            self._dropping = True
        self._partial = rest
        return out

    def flush(self) -> bytes | None:
        """The unfinished line, if any (the stream ended, or the job is
        about to mark a step's end): what follows starts a new line."""
        self._dropping = False
        tail, self._partial = self._partial, b""
        return tail or None
