"""Build states and the one pure function that validates every transition."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from control.errors import FailedPrecondition


class BuildStatus(enum.StrEnum):
    QUEUED = "queued"
    INITIALIZING = "initializing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    ERRORED = "errored"
    SUPERSEDED = "superseded"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        BuildStatus.SUCCEEDED,
        BuildStatus.FAILED,
        BuildStatus.CANCELED,
        BuildStatus.TIMED_OUT,
        BuildStatus.ERRORED,
        BuildStatus.SUPERSEDED,
    }
)
ACTIVE_STATES = frozenset({BuildStatus.INITIALIZING, BuildStatus.RUNNING})

_ALLOWED: dict[BuildStatus, frozenset[BuildStatus]] = {
    BuildStatus.QUEUED: frozenset(
        {
            BuildStatus.INITIALIZING,
            # A runner may report running before its initializing report lands.
            BuildStatus.RUNNING,
            BuildStatus.CANCELED,
            BuildStatus.SUPERSEDED,
            BuildStatus.ERRORED,
        }
    ),
    BuildStatus.INITIALIZING: frozenset(
        {
            BuildStatus.RUNNING,
            BuildStatus.SUCCEEDED,
            BuildStatus.FAILED,
            BuildStatus.CANCELED,
            BuildStatus.TIMED_OUT,
            BuildStatus.ERRORED,
        }
    ),
    BuildStatus.RUNNING: frozenset(
        {
            BuildStatus.SUCCEEDED,
            BuildStatus.FAILED,
            BuildStatus.CANCELED,
            BuildStatus.TIMED_OUT,
            BuildStatus.ERRORED,
        }
    ),
}


class StepStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELED = "canceled"


@dataclass(frozen=True)
class Step:
    name: str
    status: StepStatus = StepStatus.PENDING
    exit_code: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class StopRequest:
    """A stop someone asked for: the state the build ends in (None: the
    runner's own outcome) and why."""

    status: BuildStatus | None
    reason: str


@dataclass(frozen=True)
class Build:
    id: str
    project_id: str
    account_id: str
    branch: str
    commit_sha: str
    status: BuildStatus
    created_at: datetime
    status_reason: str = ""
    trigger: str = "manual"
    retry_of: str | None = None
    production: bool = True
    started_at: datetime | None = None
    running_at: datetime | None = None
    finished_at: datetime | None = None
    runner_id: str | None = None
    project_name: str = ""
    steps: tuple[Step, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    received_at: datetime | None = None
    # The isolation its runner gave it ("bubblewrap", "none", "nomad"), as
    # that runner reported when it took the build; "" before that.
    runner_sandbox: str = ""
    # When its runner was sent it (None: not yet, or taken back since).
    dispatched_at: datetime | None = None
    # A stop asked for it: when (None: none), the state it ends in (None:
    # the runner's own outcome) and why. The first request's fields win.
    cancel_requested_at: datetime | None = None
    cancel_status: BuildStatus | None = None
    cancel_reason: str = ""

    @property
    def stop_request(self) -> StopRequest | None:
        """The stop asked for this build, or None when nobody asked."""
        if self.cancel_requested_at is None:
            return None
        return StopRequest(self.cancel_status, self.cancel_reason)


def check_transition(current: BuildStatus, to: BuildStatus) -> None:
    """Raise ``FailedPrecondition`` naming the current state unless a build in
    ``current`` may move to ``to``. Pure: no I/O."""
    if to not in _ALLOWED.get(current, frozenset()):
        raise FailedPrecondition(f"build is {current.value}; it cannot become {to.value}")


def is_allowed(current: BuildStatus, to: BuildStatus) -> bool:
    return to in _ALLOWED.get(current, frozenset())
