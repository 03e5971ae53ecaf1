"""Log cursors: opaque strings that resume a log right after a line.

A cursor encodes the number of the last line the client has seen. Clients
must treat it as opaque; ``decode`` rejects anything it did not produce.
"""

from __future__ import annotations

import base64
import binascii

from control.errors import InvalidArgument

_PREFIX = "L1:"


def encode(last_line: int) -> str:
    """Return the cursor for "everything after line ``last_line``"."""
    if last_line < 0:
        raise ValueError("last_line must be >= 0")
    return base64.urlsafe_b64encode(f"{_PREFIX}{last_line}".encode()).decode().rstrip("=")


def decode(cursor: str) -> int:
    """Return the last line number a cursor stands for; "" means 0.

    Raises ``InvalidArgument("cursor", ...)`` for anything malformed.
    """
    if cursor == "":
        return 0
    if len(cursor) > 64:
        raise InvalidArgument("cursor", "is too long to be a cursor this server issued")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii")
    except (UnicodeError, binascii.Error, ValueError):
        raise InvalidArgument("cursor", "is not a cursor this server issued") from None
    if not text.startswith(_PREFIX):
        raise InvalidArgument("cursor", "is not a cursor this server issued")
    digits = text[len(_PREFIX) :]
    if not digits.isdigit() or not digits.isascii() or len(digits) > 18:
        raise InvalidArgument("cursor", "is not a cursor this server issued")
    return int(digits)
