"""The Jinja2 environment of the pages and the filters they use.

Autoescape is on for every template and nothing marks user text safe:
log lines, commit data, branch names and project fields are untrusted and
render as text. Times are shown in UTC with a ``<time>`` element.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import jinja2

from control.domain.build import Build, BuildStatus

# The colour family of each status: the stylesheet has one class per family.
STATUS_TONES = {
    BuildStatus.QUEUED: "waiting",
    BuildStatus.INITIALIZING: "active",
    BuildStatus.RUNNING: "active",
    BuildStatus.SUCCEEDED: "good",
    BuildStatus.FAILED: "bad",
    BuildStatus.ERRORED: "bad",
    BuildStatus.TIMED_OUT: "bad",
    BuildStatus.CANCELED: "muted",
    BuildStatus.SUPERSEDED: "muted",
}
STEP_TONES = {
    "pending": "waiting",
    "running": "active",
    "succeeded": "good",
    "failed": "bad",
    "skipped": "muted",
    "canceled": "muted",
}


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("control.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = age
    env.filters["duration"] = duration
    env.filters["utc"] = utc
    env.filters["iso"] = iso
    env.filters["short_sha"] = short_sha
    env.filters["seg"] = segment
    env.filters["tone"] = tone
    env.filters["build_duration"] = build_duration
    return env


def now() -> datetime:
    return datetime.now(UTC)


def age(at: datetime | None) -> str:
    """ "12 s ago", "5 min ago", "3 h ago", "4 d ago"; "" for None."""
    if at is None:
        return ""
    seconds = max(0, int((now() - at).total_seconds()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def duration(start: datetime | None, end: datetime | None = None) -> str:
    """The time from ``start`` to ``end`` (or now, while running): "42 s",
    "3 min 05 s", "1 h 02 min"; "" before ``start``."""
    if start is None:
        return ""
    seconds = max(0, int(((end or now()) - start).total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def build_duration(build: Build) -> str:
    return duration(build.started_at, build.finished_at)


def utc(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if at else ""


def iso(at: datetime | None) -> str:
    return at.astimezone(UTC).isoformat() if at else ""


def short_sha(sha: str) -> str:
    return sha[:10]


def segment(value: str) -> str:
    """``value`` quoted as one URL path segment."""
    return quote(value, safe="")


def tone(status: Any) -> str:
    """The colour family of a build or step status."""
    if isinstance(status, BuildStatus):
        return STATUS_TONES[status]
    return STEP_TONES.get(str(status), "muted")
