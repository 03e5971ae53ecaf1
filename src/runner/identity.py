"""A runner agent's identity: its id, kept in its work directory, and the
lock that keeps a second agent off that directory.

The control plane knows a runner by the id in its hello. An agent that
restarts on the same work directory says hello with the same id and the
builds it still runs (none, after a crash), so the control plane ends the
builds it held at once instead of waiting for the lost-runner timer.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from runner.errors import WorkDirInUse

ID_FILE = "runner-id"
LOCK_FILE = "runner.lock"


@dataclass(frozen=True)
class RunnerIdentity:
    """The id to say hello with, and the open lock file. The caller keeps
    this object for as long as the agent runs: the lock is released when
    ``lock_fd`` is closed, by ``release`` or by the process's death."""

    runner_id: str
    lock_fd: int

    def release(self) -> None:
        os.close(self.lock_fd)


def claim(work_dir: Path) -> RunnerIdentity:
    """Lock ``work_dir`` (made if missing) and return the id stored there,
    storing a new one on first use. Raises ``WorkDirInUse`` when another
    agent holds it, ``OSError`` when the directory cannot be written."""
    work_dir.mkdir(parents=True, exist_ok=True)
    # O_CLOEXEC: builds must not inherit the lock and keep it after the
    # agent died.
    fd = os.open(work_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkDirInUse(f"another runner agent is using the work directory {work_dir}") from None
    try:
        return RunnerIdentity(_load_or_create_id(work_dir / ID_FILE), fd)
    except BaseException:
        os.close(fd)
        raise


def _load_or_create_id(path: Path) -> str:
    try:
        text = path.read_text().strip()
        return str(uuid.UUID(text))
    except FileNotFoundError:
        pass
    except ValueError:
        # A torn or edited file: a new identity is safe, the old one's
        # builds then end by the lost-runner timer.
        pass
    runner_id = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(runner_id + "\n")
    tmp.replace(path)
    return runner_id
