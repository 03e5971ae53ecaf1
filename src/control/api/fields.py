"""Checks of request fields shared by the servicers."""

from __future__ import annotations

from control.errors import InvalidArgument

MAX_REF = 256


def required(field_name: str, value: str) -> str:
    """Return ``value``; raise ``InvalidArgument`` when empty or too long."""
    if not value:
        raise InvalidArgument(field_name, "is required")
    if len(value) > MAX_REF:
        raise InvalidArgument(field_name, f"must be at most {MAX_REF} characters")
    return value
