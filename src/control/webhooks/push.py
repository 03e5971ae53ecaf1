"""What a forge push means to Conveyor, whichever forge sent it."""

from __future__ import annotations

from dataclasses import dataclass

ZERO_SHA = "0" * 40


@dataclass(frozen=True)
class PushEvent:
    ref: str
    commit_sha: str
    head_message: str = ""

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def is_tag(self) -> bool:
        return self.ref.startswith("refs/tags/")

    @property
    def deletes_branch(self) -> bool:
        return self.commit_sha == ZERO_SHA


class PayloadError(ValueError):
    """The body is not a push payload of the documented shape; the message
    names the field."""


def text_field(payload: dict[str, object], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise PayloadError(f"field {name!r} must be a non-empty string")
    return value
