"""Secret masking: every secret value becomes *** before a line leaves the runner."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
# Values shorter than this would mask ordinary words ("a", "on"); they are
# still never logged by Conveyor itself, only not hunted for in output.
MIN_SECRET_LENGTH = 3


class Masker:
    def __init__(self, secrets: Iterable[str]) -> None:
        values = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None

    def mask(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)
