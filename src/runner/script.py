"""The build script a job runs: clone at the exact commit, then each step.

Steps print markers on stdout so the agent knows where each one starts and
ends: ``##conveyor:<nonce>:begin:<index>`` and
``##conveyor:<nonce>:end:<index>:<exit code>``. The nonce is random per build
so ordinary output never looks like a marker by accident.

With a build cache (``CachePlan``) the script also talks to the runner
through two pipes the launcher puts at fds 7 and 8 (``CACHE_IN_FD``,
``CACHE_OUT_FD``). After the clone it hashes the lock files and prints
``cache:restore:<key>`` (or ``none``); the runner answers on fd 7 with a
line (``exact``, ``fallback`` or ``miss``) followed by the archive, which
the script unpacks into the workspace, then prints ``cache:restored:<tar's
exit code>``. After every step succeeded, unless the restore was exact, it
prints ``cache:save:<number of cache paths present>``, streams a tar.gz of
them to fd 8 and prints ``cache:saved:<exit code>``. Archives are made and
unpacked here, in the sandbox, as the build's user: the runner only moves
bytes. Neither fd reaches a step: a process a step leaves behind cannot
hold the pipes open.
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
CACHE_MARKER_RE = re.compile(
    rb"^##conveyor:([0-9a-f]{16}):cache:(restore|restored|save|saved):([0-9a-f]{64}|none|-?\d+)$"
)
CACHE_IN_FD = 7
CACHE_OUT_FD = 8
# What the runner accepts of a project's cache settings (the control plane
# validates them the same way; a script must never get anything else).
_LOCKFILE_RE = re.compile(r"^(?!-)(?!\.{1,2}$)[A-Za-z0-9._*?\[\]-]{1,128}$")
_CACHE_PATH_RE = re.compile(r"^(?:~/)?(?!-)[A-Za-z0-9._@+-]+(?:/[A-Za-z0-9._@+-]+)*$")
# How long the script waits for the runner's restore answer before it
# builds without the cache.
RESTORE_ANSWER_TIMEOUT = 900


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
    """``steps`` are (name, command) after the clone; step 0 is the clone."""

    repo_url: str
    commit_sha: str
    branch: str
    steps: tuple[tuple[str, str], ...]
    root_directory: str = ""
    nonce: str = ""
    cache: CachePlan | None = None

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_hex(8)

    def render(self) -> str:
        """Return the bash script. It runs in the workspace directory (its
        working directory when started) and exits with the failing step's
        exit code, or 0."""
        q = shlex.quote
        marker = f"##conveyor:{self.nonce}"
        cache = self.cache.usable() if self.cache else None
        if cache is not None and not (cache.lockfiles and cache.paths):
            cache = None
        # Steps never get the cache pipes (see the module docstring).
        close = f" {CACHE_IN_FD}<&- {CACHE_OUT_FD}>&-" if cache else ""
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
            ")" + close,
            "rc=$?",
            'printf \'%s:end:0:%s\\n\' "$M" "$rc"',
            _STOP_OR_FAIL,
            f"cd {q('src/' + self.root_directory if self.root_directory else 'src')}"
            ' || { echo "root directory not found" >&2; exit 1; }',
        ]
        if cache is not None:
            lines += self._restore_lines(cache)
        for i, (_name, command) in enumerate(self.steps, start=1):
            lines += [
                f"printf '%s:begin:{i}\\n' \"$M\"",
                f"bash -e -o pipefail -c {q(command)}{close}",
                "rc=$?",
                f'printf \'%s:end:{i}:%s\\n\' "$M" "$rc"',
                _STOP_OR_FAIL,
            ]
        if cache is not None:
            lines += self._save_lines()
        lines.append("exit 0")
        return "\n".join(lines) + "\n"

    def _restore_lines(self, cache: CachePlan) -> list[str]:
        """Hash the lock files, ask the runner, unpack its answer.

        Paths the repository tracks (a committed ``vendor/``) are not the
        cache's: neither restored over the checkout nor saved. The archive
        is unpacked aside and each path moved into place only when all of it
        unpacked, so a broken archive costs the time it saved, never the
        build; an exact entry that does not unpack is saved anew."""
        q = shlex.quote
        locks = " ".join(q(p) for p in cache.lockfiles)
        dirs = " ".join(q(p) for p in cache.workspace_paths(self.root_directory))
        return [
            f"CACHE_LOCKS=({locks})",
            f"CACHE_DIRS=({dirs})",
            'there() { [ -e "$1" ] || [ -L "$1" ]; }',
            'tracked() { [ -n "$(git -C "$WS/src" ls-files -- "$1" 2>/dev/null | head -c1)" ]; }',
            "cache_dirs=()",
            'for d in "${CACHE_DIRS[@]}"; do',
            '  case $d in src/*) if tracked "${d#src/}"; then',
            '    echo "cache: ${d#src/} is in the repository; it is not cached"; continue',
            "  fi;; esac",
            '  cache_dirs+=("$d")',
            "done",
            "cache_key() {",
            "  local p f files=()",
            '  if [ "${#cache_dirs[@]}" -eq 0 ]; then echo none; return; fi',
            "  shopt -s nullglob",
            # Unquoted on purpose: the patterns are globs (checked to hold
            # no blank or shell syntax).
            '  for p in "${CACHE_LOCKS[@]}"; do',
            '    for f in $p; do [ -f "$f" ] && [ ! -L "$f" ] && files+=("$f"); done',
            "  done",
            "  shopt -u nullglob",
            '  if [ "${#files[@]}" -eq 0 ]; then echo none; return; fi',
            # Native modules differ by platform: the key includes it.
            '  { uname -m; (. /etc/os-release 2>/dev/null; echo "${ID:-}-${VERSION_ID:-}");',
            "    printf '%s\\0' \"${cache_dirs[@]}\"; printf '%s\\0' \"${files[@]}\" | sort -zu |",
            "      while IFS= read -r -d '' f; do printf '%s\\0' \"$f\"; cat -- \"$f\"; done; }"
            " | sha256sum | cut -c1-64",
            "}",
            "cache_key=$(cache_key)",
            'printf \'%s:cache:restore:%s\\n\' "$M" "$cache_key"',
            # Short reads: a stop request is noticed within a second (a
            # trapped signal does not interrupt read).
            "cache_verdict=miss",
            f"for (( i = 0; i < {RESTORE_ANSWER_TIMEOUT}; i++ )); do",
            f"  if IFS= read -r -t 1 cache_verdict <&{CACHE_IN_FD}; then break; fi",
            '  if [ "$?" -le 128 ] || [ -n "${stopping:-}" ]; then cache_verdict=miss; break; fi',
            "done",
            "rc=0",
            'if [ "$cache_verdict" = exact ] || [ "$cache_verdict" = fallback ]; then',
            '  aside="$WS/.conveyor/.cache-restore"',
            '  rm -rf -- "$aside"; mkdir -p -- "$aside"',
            f'  tar -xzf - --no-same-owner -C "$aside" <&{CACHE_IN_FD}',
            "  rc=$?",
            '  if [ "$rc" -eq 0 ]; then',
            '    for d in "${cache_dirs[@]}"; do',
            '      if there "$aside/$d" && ! there "$WS/$d"; then',
            '        mkdir -p -- "$(dirname -- "$WS/$d")" && mv -- "$aside/$d" "$WS/$d"',
            "      fi",
            "    done",
            "  else",
            "    cache_verdict=miss",
            "  fi",
            # Read-only directories (Go's module cache) would stop rm.
            '  chmod -R u+w -- "$aside" 2>/dev/null; rm -rf -- "$aside"',
            "fi",
            f"exec {CACHE_IN_FD}<&-",
            'printf \'%s:cache:restored:%s\\n\' "$M" "$rc"',
            'if [ -n "${stopping:-}" ]; then exit 143; fi',
        ]

    @staticmethod
    def _save_lines() -> list[str]:
        """Stream a tar.gz of the cache paths present to the runner, unless
        there is no key or the restore was exact (same key, same content)."""
        return [
            'if [ "$cache_key" != none ] && [ "$cache_verdict" != exact ]; then',
            "  present=()",
            '  for d in "${cache_dirs[@]}"; do',
            '    if there "$WS/$d"; then present+=("$d"); fi',
            "  done",
            '  printf \'%s:cache:save:%s\\n\' "$M" "${#present[@]}"',
            '  if [ "${#present[@]}" -gt 0 ]; then',
            # gzip -1: dependency trees compress well even so, and the
            # save is on every cache miss's critical path.
            '    ( set -o pipefail; cd "$WS" && tar -cf - -- "${present[@]}" | gzip -1 )'
            f" >&{CACHE_OUT_FD}",
            "    rc=$?",
            f"    exec {CACHE_OUT_FD}>&-",
            '    printf \'%s:cache:saved:%s\\n\' "$M" "$rc"',
            "  fi",
            "fi",
            # A stop during the save ends the build as stopped, not passed.
            'if [ -n "${stopping:-}" ]; then exit 143; fi',
        ]

    def parse_marker(self, line: bytes) -> Marker | None:
        """Return the marker on this stdout line, or None for ordinary output."""
        if not line.startswith(b"##conveyor:"):
            return None
        match = MARKER_RE.match(line)
        if match:
            if match.group(1).decode() != self.nonce:
                return None
            code = match.group(4)
            return Marker(match.group(2).decode(), int(match.group(3)), int(code) if code else None)
        cache = CACHE_MARKER_RE.match(line) if self.cache is not None else None
        if not cache or cache.group(1).decode() != self.nonce:
            return None
        kind, value = cache.group(2).decode(), cache.group(3).decode()
        if kind == "restore":
            return Marker("cache-restore", 0, None, value) if not value.isdigit() else None
        if value.lstrip("-").isdigit():
            return Marker(f"cache-{kind}", 0, int(value))
        return None
