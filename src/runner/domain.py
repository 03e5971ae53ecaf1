"""What the runner and the control plane say to each other, as the runner
sees it: plain frozen dataclasses and enums, no protobuf.

``control_client.py`` converts these to and from the wire (the only runner
module that sees generated stubs); everything else in the runner speaks
these types. ``tests/test_drift.py`` checks every enum value against the
proto's, so a status added on one side cannot be forgotten on the other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class BuildStatus(enum.StrEnum):
    """A build status the runner reports. The control plane's other
    statuses (queued, superseded) are never the runner's word."""

    INITIALIZING = "initializing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    ERRORED = "errored"


class StepStatus(enum.StrEnum):
    """A step status the runner reports: a step begins, then ends one way
    or the other. The control plane decides pending, skipped and canceled."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class EnvVar:
    """One variable of the build's environment; ``secret`` ones are masked
    in the log and never reach host-side processes."""

    name: str
    value: str
    secret: bool = False


@dataclass(frozen=True)
class Assignment:
    """One build the control plane gives this runner.

    Zero means "the default" for ``run_timeout_seconds`` (1200) and
    ``kill_grace_seconds`` (10), as on the wire. ``step_names`` and
    ``step_commands`` pair up by position. Empty ``cache_lockfiles`` means
    the project's cache is off for this build.
    """

    build_id: str
    build_token: str
    project_id: str = ""
    project_name: str = ""
    repo_url: str = ""
    branch: str = ""
    commit_sha: str = ""
    root_directory: str = ""
    step_names: tuple[str, ...] = ()
    step_commands: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()
    run_timeout_seconds: int = 0
    kill_grace_seconds: int = 0
    network_isolated: bool = False
    cache_lockfiles: tuple[str, ...] = ()
    cache_paths: tuple[str, ...] = ()
    production_branch: str = ""
    cache_generation: int = 0
    production: bool = False
    pull_request: int = 0


@dataclass(frozen=True)
class Registered:
    """The control plane took the hello; heartbeat every
    ``heartbeat_seconds`` (0: the runner's default)."""

    runner_id: str
    heartbeat_seconds: int = 0


@dataclass(frozen=True)
class Cancel:
    """Stop a build: SIGTERM, then SIGKILL after ``grace_seconds`` (0: the
    runner's default)."""

    build_id: str
    reason: str = ""
    grace_seconds: int = 0


# What the control plane sends on the runner's stream.
ControlMessage = Registered | Assignment | Cancel


@dataclass(frozen=True)
class Hello:
    """The first message of every stream: who this runner is, what it
    offers and which builds it is still running (after a reconnect)."""

    runner_id: str
    name: str
    capacity: int
    labels: tuple[str, ...]
    launcher: str
    sandbox: str
    version: str
    running_build_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Heartbeat:
    busy: int
    draining: bool = False


@dataclass(frozen=True)
class Ack:
    """The runner took (``accepted``) or refused an assignment."""

    build_id: str
    accepted: bool
    reason: str = ""


# What the runner sends on its stream.
RunnerMessage = Hello | Heartbeat | Ack


@dataclass(frozen=True)
class StepUpdate:
    """A step began (``RUNNING``, no exit code) or ended with ``exit_code``."""

    index: int
    name: str
    status: StepStatus
    at: datetime
    exit_code: int | None = None


@dataclass(frozen=True)
class StatusReport:
    """One report about a build: a new status (``None``: only steps
    changed), why, step updates and warnings for the build's page."""

    build_id: str
    at: datetime
    status: BuildStatus | None = None
    reason: str = ""
    steps: tuple[StepUpdate, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """How a build ended: a final status and the reason shown with it."""

    status: BuildStatus
    reason: str = ""
