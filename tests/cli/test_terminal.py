"""Build output on the user's terminal: colours pass, every other control
sequence a hostile build could print is shown, never obeyed."""

from __future__ import annotations

import re

import pytest

from conveyor_cli.terminal import for_terminal

ESC = "\x1b"
HOSTILE = [
    # (what it would do, the line, how it must show)
    ("OSC 52 clipboard write", f"{ESC}]52;c;cm0gLXJmIH4={ESC}\\", "^[]52;c;cm0gLXJmIH4=^[\\"),
    ("OSC 52 ended by BEL", f"{ESC}]52;c;ZXZpbA==\x07", "^[]52;c;ZXZpbA==^G"),
    ("OSC 0 window title", f"{ESC}]0;pwned\x07", "^[]0;pwned^G"),
    (
        "OSC 8 hidden link",
        f"{ESC}]8;;https://evil/{ESC}\\ok{ESC}]8;;{ESC}\\",
        "^[]8;;https://evil/^[\\ok^[]8;;^[\\",
    ),
    ("cursor position report request", f"{ESC}[6n", "^[[6n"),
    ("cursor up and erase line", f"ok{ESC}[1A{ESC}[2K", "ok^[[1A^[[2K"),
    ("clear screen", f"{ESC}[2J{ESC}[H", "^[[2J^[[H"),
    ("DECRQSS request", f"{ESC}P$q m{ESC}\\", "^[P$q m^[\\"),
    ("DCS/APC string", f"{ESC}_hidden{ESC}\\", "^[_hidden^[\\"),
    ("set title, xterm form", f"{ESC}]2;t{ESC}\\", "^[]2;t^[\\"),
    ("C1 CSI", "\u009b6n", "<U+009B>6n"),
    ("C1 OSC", "\u009d0;t\u009c", "<U+009D>0;t<U+009C>"),
    ("carriage return overwrite", "rm -rf /\rsafe   ", "rm -rf /^Msafe   "),
    ("backspaces", "evil\x08\x08\x08\x08good", "evil^H^H^H^Hgood"),
    ("bell", "\x07", "^G"),
    ("DEL", "a\x7fb", "a^?b"),
    ("NUL", "a\x00b", "a^@b"),
    ("SGR with a private marker is not SGR", f"{ESC}[?1049h", "^[[?1049h"),
    ("SGR-like with a non-digit", f"{ESC}[31;x m", "^[[31;x m"),
    ("keypad mode", f"{ESC}=", "^[="),
]


@pytest.mark.parametrize(("what", "line", "shown"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_sequences_are_shown_not_obeyed(what: str, line: str, shown: str) -> None:
    out = for_terminal(line)
    assert out == shown, what
    assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]", out)


@pytest.mark.parametrize(
    "line",
    [
        f"{ESC}[31mred{ESC}[0m",
        f"{ESC}[1;32mbold green{ESC}[m",
        f"{ESC}[38;5;208m256{ESC}[39m",
        f"{ESC}[38:2::255:100:0mtruecolor{ESC}[0m",
        "tabs\tstay\tas they are, unicode too: héllo ✓",
    ],
)
def test_colours_and_plain_text_pass_unchanged(line: str) -> None:
    assert for_terminal(line) == line


def test_only_sgr_escapes_survive_a_mix() -> None:
    line = f"{ESC}[31mE{ESC}]52;c;eA=={ESC}\\{ESC}[6n{ESC}[0m\u009b2J"
    out = for_terminal(line)
    assert out == f"{ESC}[31mE^[]52;c;eA==^[\\^[[6n{ESC}[0m<U+009B>2J"
    escapes = [m.start() for m in re.finditer(ESC, out)]
    assert all(re.match(r"\x1b\[[0-9;:]*m", out[i:]) for i in escapes)
