"""The one error tree of the runner.

Every error the runner raises on purpose is a ``RunnerError``, so a caller
can tell "the runner said no, and why" from a bug. Messages are shown to
people as they are (the operator's terminal, a build's log), so they say
what was wrong and what to do, and never contain a secret.

Some classes also derive from the built-in they replaced (``ValueError``),
so code that caught the built-in keeps working unchanged. A setting that
cannot be used is ``common.settings.ConfigError``, the one configuration
error of both the runner and the control plane.
"""

from __future__ import annotations


class RunnerError(Exception):
    """Base of every error the runner raises on purpose."""


class LaunchError(RunnerError):
    """The launcher could not start the job; the message is user-facing (it
    becomes the build's reason and a line of its log)."""


class NetworkError(RunnerError):
    """The build's own network could not be set up; the message says why.
    The local launcher reports it to the build as a ``LaunchError``."""


class ProtocolError(RunnerError, ValueError):
    """A peer (the control plane, Nomad's API) sent something its protocol
    does not allow."""


class WorkDirInUse(RunnerError):
    """Another live agent holds the work directory's lock."""
