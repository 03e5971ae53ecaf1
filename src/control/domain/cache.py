"""A project's build-cache settings and their validation. Pure: no I/O.

Runners key a project's cache on the contents of its lock files and save
its cache paths after a successful build. A project that sets no list uses
the defaults below, so the stored lists stay empty until a user chooses.
"""

from __future__ import annotations

import re

from control.errors import InvalidArgument

DEFAULT_CACHE_LOCKFILES = (
    "package-lock.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "poetry.lock",
    "uv.lock",
    "requirements*.txt",
    "Cargo.lock",
    "go.sum",
)
DEFAULT_CACHE_PATHS = (
    "node_modules",
    ".venv",
    "vendor",
    "target",
    "~/.npm",
    "~/.cache/pip",
    "~/.cache/yarn",
    "~/.cargo/registry",
    "~/go/pkg/mod",
)
MAX_CACHE_ENTRIES = 20
MAX_LOCKFILE_CHARS = 128
MAX_CACHE_PATH_CHARS = 256
HOME_PREFIX = "~/"
LOCKFILE_RE = re.compile(r"^[A-Za-z0-9._*?\[\]-]+$")
# "~" is checked separately: it may only open a path, as "~/".
CACHE_PATH_RE = re.compile(r"^[A-Za-z0-9._@+/~-]+$")


def validate_cache_lockfiles(patterns: tuple[str, ...]) -> None:
    """Raise ``InvalidArgument`` for field ``cache_lockfiles`` unless every
    pattern is a file-name glob (``*``, ``?``, ``[...]``) the runner can
    match directly in the project's root directory."""
    field = "cache_lockfiles"
    if len(patterns) > MAX_CACHE_ENTRIES:
        raise InvalidArgument(field, f"holds at most {MAX_CACHE_ENTRIES} patterns")
    for pattern in patterns:
        if not 1 <= len(pattern) <= MAX_LOCKFILE_CHARS:
            raise InvalidArgument(field, f"each pattern must be 1-{MAX_LOCKFILE_CHARS} characters")
        if "/" in pattern:
            raise InvalidArgument(
                field,
                f"{pattern!r}: patterns are file names matched in the project's root"
                " directory and hold no '/'",
            )
        if not LOCKFILE_RE.fullmatch(pattern):
            raise InvalidArgument(
                field,
                f"{pattern!r}: a pattern holds only letters, digits and . _ - * ? [ ]",
            )
        if pattern.startswith("-") or pattern in (".", ".."):
            raise InvalidArgument(
                field, f"{pattern!r}: a pattern must not start with '-' or be '.' or '..'"
            )


def validate_cache_paths(paths: tuple[str, ...]) -> None:
    """Raise ``InvalidArgument`` for field ``cache_paths`` unless every path
    is relative to the project's root directory, or starts with ``~/``
    (relative to the build's HOME), and stays inside it. A trailing ``/`` is
    refused rather than dropped, so what is stored is what was sent."""
    field = "cache_paths"
    if len(paths) > MAX_CACHE_ENTRIES:
        raise InvalidArgument(field, f"holds at most {MAX_CACHE_ENTRIES} paths")
    seen: set[str] = set()
    for path in paths:
        if not 1 <= len(path) <= MAX_CACHE_PATH_CHARS:
            raise InvalidArgument(field, f"each path must be 1-{MAX_CACHE_PATH_CHARS} characters")
        if not CACHE_PATH_RE.fullmatch(path):
            raise InvalidArgument(
                field, f"{path!r}: a path holds only letters, digits, '/' and . _ @ + - ~"
            )
        rest = path.removeprefix(HOME_PREFIX)
        if "~" in rest:
            raise InvalidArgument(
                field, f"{path!r}: '~' may only start a path, as '~/' (the build's HOME)"
            )
        if rest.startswith(("/", "-")):
            raise InvalidArgument(
                field,
                f"{path!r}: a path is relative to the project's root directory (or starts"
                " with '~/') and must not start with '/' or '-'",
            )
        if rest.endswith("/"):
            raise InvalidArgument(field, f"{path!r}: a path must not end with '/'")
        bad = next((seg for seg in rest.split("/") if seg in ("", ".", "..")), None)
        if bad is not None:
            what = "an empty" if bad == "" else f"a {bad!r}"
            raise InvalidArgument(
                field, f"{path!r}: {what} segment is not allowed (a path stays inside its base)"
            )
        if path in seen:
            raise InvalidArgument(field, f"{path!r} is listed twice")
        seen.add(path)


def effective_lockfiles(stored: tuple[str, ...]) -> tuple[str, ...]:
    """The lock-file patterns builds use: ``stored``, or the defaults when
    the project set none."""
    return stored or DEFAULT_CACHE_LOCKFILES


def effective_paths(stored: tuple[str, ...]) -> tuple[str, ...]:
    """The cache paths builds use: ``stored``, or the defaults when the
    project set none."""
    return stored or DEFAULT_CACHE_PATHS
