"""Reading settings from an environment mapping: one error type, naming the
variable.

Each helper takes the mapping (``os.environ`` in production, a dict in
tests), the variable's name and its default. An unset or empty variable
gives the default; a value that cannot be used raises ``ConfigError``
whose message starts with the variable's name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

_Choice = TypeVar("_Choice", bound=str)


class ConfigError(ValueError):
    """A setting holds a value that cannot be used. ``name`` is the variable
    (or flag) that holds it, ``reason`` says why; ``str()`` is
    ``"NAME: reason"``, fit to show an operator as is. A ``ValueError``, so
    a caller that catches those keeps working."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _raw(env: Mapping[str, str], name: str) -> str:
    return (env.get(name) or "").strip()


def integer(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number. Raises ``ConfigError`` for anything else."""
    raw = _raw(env, name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer, not {raw!r}") from None


def number(env: Mapping[str, str], name: str, default: float) -> float:
    """A number (``1``, ``0.5``, ``1e3``). Raises ``ConfigError`` for
    anything else, infinities and NaN included."""
    raw = _raw(env, name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, not {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(name, f"must be a number, not {raw!r}")
    return value


def choice(
    env: Mapping[str, str], name: str, default: _Choice, choices: Sequence[_Choice]
) -> _Choice:
    """One of ``choices``. Raises ``ConfigError`` listing them."""
    raw = _raw(env, name)
    if not raw:
        return default
    for known in choices:
        if raw == known:
            return known
    listed = " or ".join(choices) if len(choices) <= 2 else "one of " + ", ".join(choices)
    raise ConfigError(name, f"must be {listed}, not {raw!r}")


def flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    """``1``/``t``/``true``/``yes`` or ``0``/``f``/``false``/``no`` (any
    case; Nomad's own tools read ``t`` and ``f`` too). Raises
    ``ConfigError`` for anything else."""
    raw = _raw(env, name).lower()
    if not raw:
        return default
    if raw in ("1", "t", "true", "yes"):
        return True
    if raw in ("0", "f", "false", "no"):
        return False
    raise ConfigError(name, f"must be true or false, not {raw!r}")


def listed(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """The comma-separated items of the variable, stripped, empty ones left
    out; ``()`` when unset."""
    return tuple(item.strip() for item in _raw(env, name).split(",") if item.strip())


_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}  # fmt: skip
_SIZE = re.compile(r"(\d{1,19}) ?([A-Za-z]*)")


def size(env: Mapping[str, str], name: str, default: int) -> int:
    """A size in bytes: a whole number with an optional unit (``512MiB``,
    ``2GiB``, ``10GB``). Raises ``ConfigError`` for anything else."""
    raw = _raw(env, name)
    if not raw:
        return default
    match = _SIZE.fullmatch(raw)
    if match is None or match[2].lower() not in _UNITS:
        raise ConfigError(name, f"must be a size such as 512MiB, 2GiB or 1073741824, not {raw!r}")
    return int(match[1]) * _UNITS[match[2].lower()]
