"""Build output made safe for the user's terminal, as ``less -R`` shows it.

A build's log is written by the build: untrusted text. Sent to a terminal
as is, its control sequences could set the clipboard (OSC 52), the window
title (OSC 0/2), hide links (OSC 8), move the cursor to overwrite earlier
lines, or make the terminal answer on its input (``ESC[6n``, DECRQSS...).
``for_terminal`` keeps SGR sequences (colours, bold: ``ESC[...m`` with
digits, ``;`` and ``:`` only) and shows every other control character in
caret notation (``^[``, ``^G``, ``^M``) or as ``<U+009B>``, so the rest of
a sequence prints as plain text and nothing reaches the terminal as a
command.
"""

from __future__ import annotations

import re

# Kept: SGR only. Parameters are digits, ";" and ":" (colon sub-parameters
# of 24-bit colours); at most 64 of them, a colour needs far fewer.
_SGR = r"\x1b\[[0-9;:]{0,64}m"
# Every C0 control except tab, DEL, and every C1 control (U+0080-U+009F:
# some terminals read U+009B as CSI and U+009D as OSC).
_CONTROL = r"[\x00-\x08\x0a-\x1f\x7f\x80-\x9f]"
_TOKEN = re.compile(f"({_SGR})|({_CONTROL})")


def _shown(char: str) -> str:
    code = ord(char)
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    return f"<U+{code:04X}>"


def _replace(match: re.Match[str]) -> str:
    sgr, control = match.groups()
    return sgr if sgr is not None else _shown(control)


def for_terminal(text: str) -> str:
    """``text`` (one log line, without its newline) with SGR sequences kept
    and every other control character made visible and harmless."""
    return _TOKEN.sub(_replace, text)
