"""Capture log records as the JSON lines production would print.

Formatting happens in ``emit``, in the context of the code that logged, so
the lines carry the context ids exactly as they would on stderr.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from common.logging_setup import JsonFormatter


class JsonLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def where(self, **fields: Any) -> list[dict[str, Any]]:
        return [ln for ln in self.lines if all(ln.get(k) == v for k, v in fields.items())]


@contextmanager
def captured(*loggers: str) -> Iterator[JsonLines]:
    """Every record of ``loggers`` (and their children), DEBUG and up."""
    handler = JsonLines()
    saved: list[tuple[logging.Logger, int]] = []
    for name in loggers:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger, level in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
