"""A line over 64 KiB becomes one log line, cut, with a marker saying so
(issue 15, item 13): not several 64 KiB lines that look whole."""

from __future__ import annotations

import pytest

from control.storage import logs as control_logs
from runner.launchers.lines import CUT_MARKER, MAX_LINE_BYTES, LineCutter

KiB = 1024


def run(pieces: list[bytes]) -> list[bytes]:
    cutter = LineCutter()
    out = [line for piece in pieces for line in cutter.feed(piece)]
    tail = cutter.flush()
    return out + ([tail] if tail is not None else [])


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


LONG = b"x" * (200 * KiB)
CUT = b"x" * MAX_LINE_BYTES + CUT_MARKER


@pytest.mark.parametrize(
    ("output", "lines"),
    [
        (b"a\nb\n", [b"a", b"b"]),
        (b"a\n\nb", [b"a", b"", b"b"]),
        (b"x" * MAX_LINE_BYTES + b"\n", [b"x" * MAX_LINE_BYTES]),
        (b"x" * (MAX_LINE_BYTES + 1) + b"\nnext\n", [CUT, b"next"]),
        (LONG + b"\nnext\n", [CUT, b"next"]),
        (LONG, [CUT]),
        (b"before\n" + LONG + b"\n" + LONG + b"\nafter", [b"before", CUT, CUT, b"after"]),
        # Cut at a character boundary: "é" is two bytes.
        (
            b"x" * (MAX_LINE_BYTES - 1) + "é".encode() * 10 + b"\n",
            [b"x" * (MAX_LINE_BYTES - 1) + CUT_MARKER],
        ),
    ],
)
@pytest.mark.parametrize("size", [1 << 30, 64 * KiB, 4 * KiB, 7_001])
def test_lines_however_the_output_is_read(output: bytes, lines: list[bytes], size: int) -> None:
    assert run(chunks(output, size)) == lines


def test_a_flush_ends_a_cut_line() -> None:
    """Output before a step's end marker is flushed: the next step's output
    starts a new line even when the flushed line had been cut."""
    cutter = LineCutter()
    assert cutter.feed(LONG) == [CUT]
    assert cutter.flush() is None
    assert cutter.feed(b"next step\n") == [b"next step"]


def test_cut_lines_decode_as_utf8() -> None:
    (line,) = run([b"x" * (MAX_LINE_BYTES - 2) + "€".encode() * 3])
    assert line.decode("utf-8").endswith(CUT_MARKER.decode())


def test_the_control_plane_cuts_the_same_way() -> None:
    """The control plane's own cut (for clients that are not this runner)
    has the same length and marker, so a cut line is not cut again."""
    assert control_logs.MAX_LINE_BYTES == MAX_LINE_BYTES
    assert CUT_MARKER.decode() == control_logs.CUT_MARKER
    text = CUT.decode()
    assert control_logs.clean_text(text).endswith(control_logs.CUT_MARKER)
    assert control_logs.clean_text(text).count("[conveyor: line cut") == 1
