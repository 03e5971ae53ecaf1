"""The Launcher protocol: how the runner agent starts a build's job.

A launcher runs one build script (see ``runner.script``) somewhere (a local
sandbox, a Nomad batch job), streams its output lines back, and stops it on
request. It knows nothing about steps: the agent reads step markers from the
output. Every implementation passes ``tests/runner/test_launcher_contract.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

# Launchers raise it; it lives with the runner's other errors.
from runner.errors import LaunchError as LaunchError

# "control": a line of the script's control channel (its step markers), for
# launchers whose ``control_channel`` is true; never a line of the build's.
Stream = Literal["stdout", "stderr", "system", "control"]


@dataclass(frozen=True)
class Limits:
    """Resource limits of one build job. Zero means "launcher default"."""

    memory_mb: int = 2048
    cpu_seconds: int = 0
    max_processes: int = 512
    workspace_mb: int = 4096
    cpu_mhz: int = 1000
    disk_mb: int = 4096


@dataclass(frozen=True)
class JobSpec:
    """Everything a launcher needs to run one build.

    ``script`` is a complete bash script; ``env`` is the environment the script
    sees, ``secret_env`` the secret part of it, which a launcher must never
    write into a stored job spec or a log. ``local_paths`` are host paths the
    script must be able to read (a repository given as a local path).
    ``cache_fds``, for a launcher whose ``supports_cache`` is true, are the
    job's ends of the build-cache pipes (one it reads, one it writes): the
    script must find them at ``runner.script.CACHE_IN_FD`` and
    ``CACHE_OUT_FD``. The caller keeps and closes them after ``launch``.
    """

    build_id: str
    script: str
    env: Mapping[str, str]
    secret_env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    network: bool = True
    local_paths: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    cache_fds: tuple[int, int] | None = None


@dataclass(frozen=True)
class OutputLine:
    """One line of a job's output, without its line ending, as raw bytes."""

    stream: Stream
    data: bytes


@dataclass(frozen=True)
class JobResult:
    """How a job ended.

    ``exit_code`` is the script's exit status, or None when the job never ran
    or was killed without one. ``error`` is set when the launcher itself failed
    (no node fits, driver failure, sandbox setup): the build then errors with
    that reason instead of failing.
    """

    exit_code: int | None
    error: str | None = None
    killed: bool = False


class Job(Protocol):
    """A started job. The caller must consume ``output()`` to its end and then
    await ``wait()``; ``stop()`` may be called at any time, more than once."""

    def output(self) -> AsyncIterator[OutputLine]:
        """Yield output lines in order until the job has ended and every line
        was delivered."""
        ...

    async def wait(self) -> JobResult:
        """Return how the job ended, once it has."""
        ...

    async def stop(self, grace_seconds: float) -> None:
        """Ask the job to stop (SIGTERM or the launcher's equivalent), then
        kill it after ``grace_seconds``. Returns once the kill was sent or the
        job has ended; never raises for a job that already ended."""
        ...


class Launcher(Protocol):
    """Starts jobs. ``launch`` raises ``LaunchError`` when the job could not
    even be submitted. ``supports_cache`` says whether jobs can get the
    build-cache pipes (``JobSpec.cache_fds``); ``control_channel`` whether
    the script finds a channel at ``runner.script.CONTROL_FD`` that no step
    can write, whose lines ``output()`` yields as "control" lines in order
    with the build's output (the script's markers then travel there)."""

    name: str
    supports_cache: bool
    control_channel: bool

    async def launch(self, spec: JobSpec) -> Job: ...

    async def close(self) -> None: ...
