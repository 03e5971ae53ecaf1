"""The build script a job runs: clone at the exact commit, then each step.

Steps print markers on stdout so the agent knows where each one starts and
ends: ``##conveyor:<nonce>:begin:<index>`` and
``##conveyor:<nonce>:end:<index>:<exit code>``. The nonce is random per build
so ordinary output never looks like a marker by accident.
"""

from __future__ import annotations

import re
import secrets
import shlex
from dataclasses import dataclass

# After each step: a failing step ends the script with its exit code, and so
# does a stop request (143, as for SIGTERM) even when the step exited 0.
_STOP_OR_FAIL = 'if [ "$rc" -ne 0 ] || [ -n "${stopping:-}" ]; then exit "$(( rc ? rc : 143 ))"; fi'
MARKER_RE = re.compile(rb"^##conveyor:([0-9a-f]{16}):(begin|end):(\d+)(?::(-?\d+))?$")


@dataclass(frozen=True)
class Marker:
    kind: str  # "begin" | "end"
    index: int
    exit_code: int | None


@dataclass(frozen=True)
class BuildScript:
    """``steps`` are (name, command) after the clone; step 0 is the clone."""

    repo_url: str
    commit_sha: str
    branch: str
    steps: tuple[tuple[str, str], ...]
    root_directory: str = ""
    nonce: str = ""

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_hex(8)

    def render(self) -> str:
        """Return the bash script. It runs in the workspace directory (its
        working directory when started) and exits with the failing step's
        exit code, or 0."""
        q = shlex.quote
        marker = f"##conveyor:{self.nonce}"
        lines = [
            "#!/usr/bin/env bash",
            "set -u",
            f"M={q(marker)}",
            "export GIT_TERMINAL_PROMPT=0",
            "WS=$PWD",
            # On SIGTERM the script itself waits for the running step (it
            # gets the signal too) and then stops; a handler rather than an
            # ignored signal, so that steps start with the default action.
            "trap 'stopping=1' TERM",
            "printf '%s:begin:0\\n' \"$M\"",
            "(",
            "  set -e",
            # The repository may belong to another uid (a local path given to
            # the sandbox read-only). git honours safe.directory only from
            # global config, also in the upload-pack it spawns.
            '  mkdir -p "$WS/.conveyor"',
            '  export GIT_CONFIG_GLOBAL="$WS/.conveyor/clone.gitconfig"',
            "  printf '[safe]\\n\\tdirectory = *\\n' > \"$GIT_CONFIG_GLOBAL\"",
            "  git init -q src",
            "  cd src",
            f"  git remote add origin {q(self.repo_url)}",
            # A shallow fetch of the exact commit; servers that refuse
            # fetching by id get the branch, then the full history.
            f"  if ! git fetch -q --depth 1 origin {q(self.commit_sha)}; then",
            f"    git fetch -q origin {q('+refs/heads/' + self.branch)} || git fetch -q origin",
            "  fi",
            f"  git -c advice.detachedHead=false checkout -q --detach {q(self.commit_sha)}",
            '  echo "checked out $(git rev-parse HEAD)"',
            ")",
            "rc=$?",
            'printf \'%s:end:0:%s\\n\' "$M" "$rc"',
            _STOP_OR_FAIL,
            f"cd {q('src/' + self.root_directory if self.root_directory else 'src')}"
            ' || { echo "root directory not found" >&2; exit 1; }',
        ]
        for i, (_name, command) in enumerate(self.steps, start=1):
            lines += [
                f"printf '%s:begin:{i}\\n' \"$M\"",
                f"bash -e -o pipefail -c {q(command)}",
                "rc=$?",
                f'printf \'%s:end:{i}:%s\\n\' "$M" "$rc"',
                _STOP_OR_FAIL,
            ]
        lines.append("exit 0")
        return "\n".join(lines) + "\n"

    def parse_marker(self, line: bytes) -> Marker | None:
        """Return the marker on this stdout line, or None for ordinary output."""
        if not line.startswith(b"##conveyor:"):
            return None
        match = MARKER_RE.match(line)
        if not match or match.group(1).decode() != self.nonce:
            return None
        code = match.group(4)
        return Marker(match.group(2).decode(), int(match.group(3)), int(code) if code else None)
