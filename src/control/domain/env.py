"""Validation of project environment variables. Pure: no I/O."""

from __future__ import annotations

import re

from control.errors import InvalidArgument

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Every build sees these; a project must not shadow them.
RESERVED_PREFIXES = ("CONVEYOR_",)
RESERVED_NAMES = frozenset({"CI", "PATH", "HOME", "PWD", "SHLVL", "LANG", "TMPDIR"})
# The project secret holding the forge token: read by the control plane's
# status reporter only, never given to builds.
FORGE_TOKEN = "FORGE_TOKEN"  # noqa: S105 (a variable's name, not a secret)
MAX_VALUE_BYTES = 16 * 1024
MAX_VARS_PER_PROJECT = 128


def validate_var(name: str, value: str) -> None:
    """Raise ``InvalidArgument`` naming the field that is wrong."""
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            "name", "must start with a letter or '_' and hold only letters, digits and '_' (1-128)"
        )
    if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
        raise InvalidArgument("name", f"{name} is reserved for Conveyor")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise InvalidArgument("value", f"must be at most {MAX_VALUE_BYTES} bytes")
    if "\0" in value:
        raise InvalidArgument("value", "must not contain NUL bytes")
