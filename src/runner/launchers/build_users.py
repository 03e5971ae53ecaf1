"""Host uids for local builds: one per running build, never shared.

A build's processes run as ``conveyor-build-<slot>``, a system user created
on first use. A slot is held through an flock on
``/run/conveyor/build-slot-<slot>.lock`` for as long as its build runs, so
two runner processes on one host never hand out the same uid, and the
slots of a runner that crashed free themselves (the kernel drops its locks).

Why not one shared build user: RLIMIT_NPROC counts every process of a uid,
so with a shared uid one build's fork bomb starves every other build of the
host; and a workspace (mode 0700, owned by its build's uid) would be
readable by every other build that ever got outside its mount namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from runner.launchers.base import LaunchError

log = logging.getLogger(__name__)

USER_PREFIX = "conveyor-build"
LOCK_DIR = Path("/run/conveyor")


@dataclass(frozen=True)
class BuildUser:
    """The host identity one build runs as, while its slot is held."""

    slot: int
    name: str
    uid: int
    gid: int


class BuildUsers:
    """Hands out build users. ``acquire`` and ``release`` block (useradd,
    file locks, a process scan): call them in a thread. The caller must
    ``release`` every user it acquired, after the build's processes ended."""

    def __init__(
        self,
        *,
        prefix: str = USER_PREFIX,
        lock_dir: Path = LOCK_DIR,
        max_slots: int = 1000,
    ) -> None:
        self.prefix = prefix
        self.lock_dir = lock_dir
        self.max_slots = max_slots
        self._held: dict[int, int] = {}  # slot -> fd holding its flock
        self._mutex = threading.Lock()

    @property
    def held(self) -> int:
        """How many slots this process holds now."""
        with self._mutex:
            return len(self._held)

    def acquire(self) -> BuildUser:
        """Take the lowest free slot and return its user, creating the user
        on first use. Raises ``LaunchError`` when every slot is taken or the
        user cannot be created."""
        self.lock_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        with self._mutex:
            for slot in range(self.max_slots):
                if slot in self._held:
                    continue
                fd = self._try_lock(slot)
                if fd is None:
                    continue
                self._held[slot] = fd
                break
            else:
                raise LaunchError(f"all {self.max_slots} build user slots are in use on this host")
        try:
            user = self._user(slot)
        except BaseException:
            self._unlock(slot)
            raise
        # A process left behind by an earlier holder of the slot (a runner
        # that died between its build ending and its cleanup) must not meet
        # the next build under the same uid.
        kill_processes_of(user.uid)
        return user

    def release(self, user: BuildUser) -> None:
        """Kill whatever still runs as ``user`` and free its slot."""
        kill_processes_of(user.uid)
        self._unlock(user.slot)

    def _try_lock(self, slot: int) -> int | None:
        path = self.lock_dir / f"build-slot-{slot}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _unlock(self, slot: int) -> None:
        with self._mutex:
            fd = self._held.pop(slot, None)
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock

    def _user(self, slot: int) -> BuildUser:
        name = f"{self.prefix}-{slot}"
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            entry = _create_user(name, slot)
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise LaunchError(f"build user {name} has uid or gid 0; refusing to run builds as it")
        return BuildUser(slot, name, entry.pw_uid, entry.pw_gid)


def _create_user(name: str, slot: int) -> pwd.struct_passwd:
    log.info("creating build user %s", name)
    try:
        done = subprocess.run(
            [
                "useradd", "--system", "--user-group", "--no-create-home",
                "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                "--comment", f"Conveyor build slot {slot}", name,
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"could not create the build user {name}: {exc}") from exc
    try:
        return pwd.getpwnam(name)
    except KeyError:
        why = done.stderr.strip() or f"useradd exited with {done.returncode}"
        raise LaunchError(f"could not create the build user {name}: {why}") from None


def kill_processes_of(uid: int) -> None:
    """SIGKILL every live process whose real or effective uid is ``uid``."""
    for proc in psutil.process_iter(["uids", "status"]):
        uids = proc.info["uids"]
        if uids is None or uid not in (uids.real, uids.effective):
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # dead already, its parent has yet to reap it
        log.info("killing process %d left behind by uid %d", proc.pid, uid)
        with contextlib.suppress(psutil.Error):
            proc.kill()
