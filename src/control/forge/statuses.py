"""Commit statuses, whichever forge receives them: the ``CommitStatuses``
protocol every forge client implements, what a build's state means as a
status, and the HTTP call the clients share."""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from control.domain.build import Build, BuildStatus
from control.domain.project import DEFAULT_FORGE_API

DEFAULT_API = DEFAULT_FORGE_API
# An answer body is read up to this size: enough for any error message.
MAX_ANSWER_BYTES = 64 * 1024


class ForgeState(enum.StrEnum):
    """A commit status in Conveyor's words; each client maps it to its
    forge's (GitHub has no running or canceled, GitLab no error)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"
    CANCELED = "canceled"


@dataclass(frozen=True)
class ForgeTarget:
    """Where a status goes: the forge, its API base URL, the repository
    ("owner/repo" or a GitLab project id or path) and the token to use."""

    forge: str
    api_url: str
    repo: str
    token: str

    def __repr__(self) -> str:
        # Never print the token, whoever logs a target.
        return f"ForgeTarget({self.forge!r}, {self.api_url!r}, {self.repo!r})"


@dataclass(frozen=True)
class StatusUpdate:
    sha: str
    state: ForgeState
    description: str
    target_url: str
    context: str
    ref: str = ""


class ForgeError(Exception):
    """A status was not delivered. ``status`` is the HTTP status when the
    forge answered; the message never contains the token."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class ForgeUnavailable(ForgeError):
    """No answer, a 5xx, 429 or a rate limit: the same request may work later."""


class ForgeRejected(ForgeError):
    """The forge refused the request (bad token, unknown repository, invalid
    field): sending it again would fail again."""


class CommitStatuses(Protocol):
    """A forge's commit-status API. ``post`` returns once the forge stored
    the status and raises ``ForgeUnavailable`` or ``ForgeRejected``."""

    forge: str

    def forge_state(self, state: ForgeState) -> str:
        """The forge's own word for ``state``."""
        ...

    async def post(self, target: ForgeTarget, update: StatusUpdate) -> None: ...


_FINAL_LABELS = {
    BuildStatus.FAILED: (ForgeState.FAILURE, "failed"),
    BuildStatus.TIMED_OUT: (ForgeState.FAILURE, "timed out"),
    BuildStatus.ERRORED: (ForgeState.ERROR, "errored"),
    BuildStatus.CANCELED: (ForgeState.CANCELED, "canceled"),
    BuildStatus.SUPERSEDED: (ForgeState.CANCELED, "superseded"),
}


def status_of(build: Build) -> tuple[ForgeState, str]:
    """The commit status and description that say where ``build`` is."""
    kind = "Build" if build.production else "Preview"
    if build.status == BuildStatus.QUEUED:
        return ForgeState.PENDING, f"{kind} queued"
    if build.status == BuildStatus.INITIALIZING:
        return ForgeState.RUNNING, f"{kind} starting"
    if build.status == BuildStatus.RUNNING:
        return ForgeState.RUNNING, f"{kind} running"
    if build.status == BuildStatus.SUCCEEDED:
        return ForgeState.SUCCESS, f"{kind} succeeded"
    state, label = _FINAL_LABELS[build.status]
    reason = build.status_reason.strip()
    return state, f"{kind} {label}" + (f": {reason}" if reason else "")


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    body: Mapping[str, object],
    within: float,
) -> tuple[int, object]:
    """POST ``body`` as JSON; return (status, decoded answer or None) for a
    2xx. Raises ``ForgeUnavailable`` for no answer ``within`` seconds, a
    5xx, 429 or a GitHub rate limit (403 with no requests left),
    ``ForgeRejected`` for any other status; both name the forge's message."""
    try:
        async with (
            asyncio.timeout(within),
            session.post(url, json=body, headers=dict(headers), allow_redirects=False) as resp,
        ):
            raw = await resp.content.read(MAX_ANSWER_BYTES)
            status = resp.status
            retry_after = _seconds(resp.headers.get("Retry-After"))
            limited = resp.headers.get("X-RateLimit-Remaining") == "0"
    except TimeoutError:
        raise ForgeUnavailable(f"no answer within {within:g} s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise ForgeUnavailable(f"{type(exc).__name__}: {exc}") from None
    try:
        answer: object = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        answer = None
    if 200 <= status < 300:
        return status, answer
    message = f"HTTP {status}: {_message(answer) or raw[:200].decode(errors='replace')}"
    if status == 429 or status >= 500 or (status == 403 and limited):
        raise ForgeUnavailable(message, status=status, retry_after=retry_after)
    raise ForgeRejected(message, status=status)


def _message(answer: object) -> str:
    """The human part of a forge's error answer (GitHub: ``message`` and
    ``errors``; GitLab: ``message`` or ``error``)."""
    if not isinstance(answer, dict):
        return ""
    parts = [str(answer.get("message") or answer.get("error") or "")]
    errors = answer.get("errors")
    if isinstance(errors, list):
        parts += [str(e.get("message", "")) for e in errors if isinstance(e, dict)]
    return "; ".join(p for p in parts if p)[:300]


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
