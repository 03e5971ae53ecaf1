"""The one error tree of the control plane.

Storage and domain code raise these; ``api/errors.py`` maps each to a gRPC
status code and the HTTP side maps them to status codes. The message is shown
to the client as is, so it names the field or state that was wrong and never
contains a secret.
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Base of every error a client may see."""


class NotFound(ConveyorError):
    """The thing does not exist, or belongs to another account (the same
    answer for both, so existence never leaks)."""


class AlreadyExists(ConveyorError):
    pass


class InvalidArgument(ConveyorError):
    """A request field is wrong. ``field`` names it, ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class FailedPrecondition(ConveyorError):
    """The request is valid but the current state does not allow it."""


class PermissionDenied(ConveyorError):
    pass


class Unauthenticated(ConveyorError):
    pass


class Unavailable(ConveyorError):
    """A dependency (database, runner) is not reachable right now; retry."""


class ResourceExhausted(ConveyorError):
    """A shared resource (the database's disk) is running out; the same
    request may succeed once an operator freed it, so clients resend later."""
