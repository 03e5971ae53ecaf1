"""Checks of request fields shared by the servicers."""

from __future__ import annotations

from control.errors import InvalidArgument

MAX_REF = 256


def required(field_name: str, value: str) -> str:
    """Return ``value``; raise ``InvalidArgument`` when empty, too long or
    holding a control character (no name, id or ref has one)."""
    if not value:
        raise InvalidArgument(field_name, "is required")
    if len(value) > MAX_REF:
        raise InvalidArgument(field_name, f"must be at most {MAX_REF} characters")
    if has_control(value):
        raise InvalidArgument(field_name, "must not contain control characters")
    return value


def has_control(value: str) -> bool:
    """Whether ``value`` holds a control character (C0, DEL or C1)."""
    return any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in value)
