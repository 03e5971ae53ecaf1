"""The build script a job runs: clone at the exact commit, then each step.

The script is ``runner/scripts/build.sh`` (shell, linted by shellcheck)
below a header of shell-quoted variables this module renders for one build.

The script tells the runner where each step begins and ends with markers:
``begin:<index>`` and ``end:<index>:<exit code>``. Where the launcher gives
the job a control channel (``channel``: a socket at fd ``CONTROL_FD``, the
local launcher), markers travel on it, and only there: no step gets the fd,
and the script runs as an execute-only copy of bash, which the kernel makes
non-dumpable, so a step cannot reach it through ``/proc/<pid>/fd``,
``ptrace`` or ``pidfd_getfd`` either. What a step prints on stdout is
output, whatever it looks like. Without a channel (Nomad), markers are
stdout lines ``##conveyor:<nonce>:<marker>``, the nonce random per build so
that ordinary output never looks like a marker by accident (a step that
reads the script can print them).

With a build cache (``CachePlan``) the script also talks to the runner
through two pipes the launcher puts at fds 7 and 8 (``CACHE_IN_FD``,
``CACHE_OUT_FD``). After the clone it hashes the lock files and marks
``cache:restore:<key>`` (or ``none``); the runner answers on fd 7 with a
line (``exact``, ``fallback`` or ``miss``) followed by the archive, which
the script unpacks into the workspace, then marks ``cache:restored:<tar's
exit code>``. After every step succeeded, unless the restore was exact, it
marks ``cache:save:<number of cache paths present>``, streams a tar.gz of
them to fd 8 and marks ``cache:saved:<exit code>``. Archives are made and
unpacked here, in the sandbox, as the build's user: the runner only moves
bytes. Neither fd reaches a step: a process a step leaves behind cannot
hold the pipes open.
"""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

from runner.launchers.base import OutputLine

STEP_MARKER_RE = re.compile(rb"^(begin|end):(\d+)(?::(-?\d+))?$")
CACHE_MARKER_RE = re.compile(rb"^cache:(restore|restored|save|saved):([0-9a-f]{64}|none|-?\d+)$")
STDOUT_MARKER_RE = re.compile(rb"^##conveyor:([0-9a-f]{16}):(.*)$")
CACHE_IN_FD = 7
CACHE_OUT_FD = 8
CONTROL_FD = 9
# What the runner accepts of a project's cache settings (the control plane
# validates them the same way; a script must never get anything else).
_LOCKFILE_RE = re.compile(r"^(?!-)(?!\.{1,2}$)[A-Za-z0-9._*?\[\]-]{1,128}$")
_CACHE_PATH_RE = re.compile(r"^(?:~/)?(?!-)[A-Za-z0-9._@+-]+(?:/[A-Za-z0-9._@+-]+)*$")
# How long the script waits for an answer of the runner's (the cache
# restore's verdict, a marker's acknowledgement) before it goes on without.
RESTORE_ANSWER_TIMEOUT = 900
_BODY = resources.files("runner").joinpath("scripts/build.sh").read_text()


@dataclass(frozen=True)
class Marker:
    """A marker line. Steps: kind "begin" or "end" with the step ``index``
    (and ``exit_code`` at the end). Cache: kind "cache-restore" (``value``
    the key or "none"), "cache-restored" (``exit_code``), "cache-save"
    (``exit_code`` holds the number of paths present) or "cache-saved"
    (``exit_code``)."""

    kind: str
    index: int
    exit_code: int | None
    value: str = ""


@dataclass(frozen=True)
class CachePlan:
    """The script's side of the build cache: the lock-file globs (file
    names in the project's root directory) whose contents key it, and the
    paths it holds (relative to the root directory, or ``~/`` for the
    build's HOME)."""

    lockfiles: tuple[str, ...]
    paths: tuple[str, ...]

    def usable(self) -> CachePlan:
        """The plan without any entry the runner does not accept."""
        return CachePlan(
            tuple(p for p in self.lockfiles if _LOCKFILE_RE.match(p)),
            tuple(
                p
                for p in self.paths
                if _CACHE_PATH_RE.match(p) and not {".", ".."} & set(p.split("/"))
            ),
        )

    def workspace_paths(self, root_directory: str) -> tuple[str, ...]:
        """The cache paths relative to the workspace (HOME is its
        ``.conveyor``, the repository its ``src``)."""
        root = f"src/{root_directory}" if root_directory else "src"
        return tuple(
            f".conveyor/{p[2:]}" if p.startswith("~/") else f"{root}/{p}" for p in self.paths
        )


@dataclass(frozen=True)
class BuildScript:
    """``steps`` are (name, command) after the clone; step 0 is the clone.
    ``channel``: markers go to the launcher's control channel (fd
    ``CONTROL_FD``), else to stdout behind ``nonce``."""

    repo_url: str
    commit_sha: str
    branch: str
    steps: tuple[tuple[str, str], ...]
    root_directory: str = ""
    nonce: str = ""
    cache: CachePlan | None = None
    channel: bool = False

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_hex(8)

    def render(self) -> str:
        """Return the bash script. It runs in the workspace directory (its
        working directory when started) and exits with the failing step's
        exit code, or 0."""
        q = shlex.quote
        cache = self.cache.usable() if self.cache else None
        if cache is None or not (cache.lockfiles and cache.paths):
            cache = CachePlan((), ())
        header = {
            "REPO_URL": q(self.repo_url),
            "COMMIT_SHA": q(self.commit_sha),
            "BRANCH": q(self.branch),
            "ROOT_DIR": q(self.root_directory),
            "MARKER_PREFIX": "''" if self.channel else q(f"##conveyor:{self.nonce}"),
            "ANSWER_TIMEOUT": str(RESTORE_ANSWER_TIMEOUT),
            "STEPS": _array(command for _name, command in self.steps),
            "CACHE_LOCKS": _array(cache.lockfiles),
            "CACHE_DIRS": _array(cache.workspace_paths(self.root_directory)),
        }
        lines = [
            "#!/usr/bin/env bash",
            "# One build's values (runner.script), quoted: nothing in them expands.",
            "# The body below is runner/scripts/build.sh.",
            "# shellcheck disable=SC2016",
            "{",
            *(f"{name}={value}" for name, value in header.items()),
            "}",
        ]
        return "\n".join(lines) + "\n" + _BODY

    def marker_of(self, line: OutputLine) -> Marker | None:
        """The marker ``line`` carries, or None for output. With a channel
        only its lines are markers; without, stdout lines with the nonce."""
        if self.channel:
            return (
                _parse(line.data, cache=self.cache is not None)
                if line.stream == "control"
                else None
            )
        if line.stream != "stdout":
            return None
        return self.parse_marker(line.data)

    def parse_marker(self, line: bytes) -> Marker | None:
        """Return the marker on this stdout line (no channel), or None for
        ordinary output."""
        if not line.startswith(b"##conveyor:"):
            return None
        match = STDOUT_MARKER_RE.match(line)
        if not match or match.group(1).decode() != self.nonce:
            return None
        return _parse(match.group(2), cache=self.cache is not None)


def _array(items: Iterable[str]) -> str:
    """A bash array literal of ``items``, each shell-quoted."""
    return "(" + " ".join(shlex.quote(item) for item in items) + ")"


def _parse(body: bytes, *, cache: bool) -> Marker | None:
    """The marker ``body`` ("begin:1", "cache:save:2"...) names, or None."""
    match = STEP_MARKER_RE.match(body)
    if match:
        code = match.group(3)
        return Marker(match.group(1).decode(), int(match.group(2)), int(code) if code else None)
    found = CACHE_MARKER_RE.match(body) if cache else None
    if not found:
        return None
    kind, value = found.group(1).decode(), found.group(2).decode()
    if kind == "restore":
        return Marker("cache-restore", 0, None, value) if not value.isdigit() else None
    if value.lstrip("-").isdigit():
        return Marker(f"cache-{kind}", 0, int(value))
    return None
