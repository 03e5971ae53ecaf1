"""The parent-death signal of a child of ``conveyor up``.

``up`` names itself in the child's environment; the child asks the kernel
for SIGKILL when ``up`` dies, however it died (kill -9 included), so no
runner agent outlives the ``up`` that started it.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import MutableMapping

# Set by `up` in its child's environment to its own pid.
PARENT_ENV = "CONVEYOR_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def die_with_parent(env: MutableMapping[str, str]) -> None:
    """Have the kernel SIGKILL this process when the parent named in ``env``
    dies. Call it first thing, before any thread starts: the signal follows
    the parent's thread that forked us, which is ``up``'s main thread. Does
    nothing unless ``env`` names a parent (the variable is removed, so
    grandchildren do not inherit it); exits at once when that parent is
    already gone. Raises ``OSError`` when the kernel refuses."""
    raw = env.pop(PARENT_ENV, "")
    if not raw:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    # The parent may have died between our fork and the prctl.
    if os.getppid() != int(raw):
        os._exit(1)
