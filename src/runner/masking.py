"""Secret masking: every secret value becomes *** before a line leaves the runner.

Besides the value itself, its hex (lower and upper case) and base64 forms
(standard and URL-safe, at each of the three alignments a value can have
inside a longer encoded text) are masked, so ``echo $TOKEN | base64`` does
not print the token in a form anyone can decode. This catches accidents,
not intent: a build that wants to leak a secret can always encode it some
other way (reverse it, split it, encrypt it, send it over the network).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

MASK = "***"
# Values shorter than this would mask ordinary words ("a", "on"); they are
# still never logged by Conveyor itself, only not hunted for in output.
MIN_SECRET_LENGTH = 3
# Encoded forms shorter than this would mask random-looking output (hashes,
# ids) far too often; they come from secrets of a few bytes only.
MIN_ENCODED_LENGTH = 8
_URLSAFE = str.maketrans("+/", "-_")


def encoded_forms(value: str) -> set[str]:
    """The value's hex and base64 spellings that are masked with it: for
    base64, the characters that depend on the value's bytes alone at each
    alignment (what stays the same whatever surrounds it)."""
    raw = value.encode()
    forms = {raw.hex(), raw.hex().upper()}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode()
        # Characters wholly inside the value's bits: from the first one
        # after the padding bytes to the last one before what follows.
        start = -(-offset * 8 // 6)
        end = (offset + len(raw)) * 8 // 6
        core = encoded[start:end]
        forms.update((core, core.translate(_URLSAFE)))
    return {f for f in forms if len(f) >= MIN_ENCODED_LENGTH}


class Masker:
    def __init__(self, secrets: Iterable[str]) -> None:
        plain = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
        forms = set(plain)
        for value in plain:
            forms |= encoded_forms(value)
        # Longest first: a value that contains another is masked whole.
        values = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None

    def mask(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)
