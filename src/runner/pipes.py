"""Small pipe helpers shared by the launchers and the build cache."""

from __future__ import annotations

import contextlib
import os


def data_fd(data: bytes) -> int:
    """A pipe's read end holding ``data`` and then its end, for a child
    that reads a whole file from a descriptor (bubblewrap's ``--seccomp``
    and ``--ro-bind-data``). ``data`` must fit in a pipe (64 KiB). The
    caller closes it. Raises ``OSError``."""
    read, write = os.pipe()
    try:
        os.write(write, data)
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    return read


def close_fd(fd: int) -> int:
    """Close ``fd`` unless it is -1 (closed already), ignoring errors;
    return -1 for the caller to store in its place."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    return -1
