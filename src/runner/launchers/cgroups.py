"""Per-build cgroups (v1): limits and accounting for a build as a whole.

rlimits apply to each process separately (ten processes may each use the
whole memory limit) and RLIMIT_NPROC counts per uid; a cgroup per build
bounds the build's total memory (page cache and tmpfs included) and process
count, accounts its total CPU time, and lists every process it has, which
makes "kill the whole build" reliable.

Used when the runner is root and the ``memory``, ``pids`` and ``cpuacct``
controllers are mounted as cgroup v1 hierarchies. A build's cgroup is
``<hierarchy>/conveyor-builds/slot-<n>``, named after its build user's slot
(``build_users``): the slot is the build's alone on this host while it
runs, so no other runner (or launcher) ever touches that cgroup, and one a
dead runner left behind is reused by the next build of the slot. They sit at
the top of each hierarchy, as container engines' do, not below the runner's
own cgroup: that one belongs to whoever started the runner (systemd, a
container), who must be able to remove it afterwards. cgroup v2 (the unified
hierarchy) is not supported yet: there the launcher falls back to rlimits.

The job joins its cgroups itself, before it forks and before it drops root
for the build's uid (its first shell writes ``0`` to each
``cgroup.procs``; see ``local._SHIM``). The cgroups stay root's, and the
sandbox has no /sys anyway.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from runner.launchers.base import Limits

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpuacct")
GROUP_DIR = "conveyor-builds"
_MiB = 1024 * 1024


@dataclass(frozen=True)
class CgroupRoot:
    """Where build cgroups go: one parent directory per controller."""

    parents: dict[str, Path]

    @classmethod
    def detect(cls, mountinfo: Path = Path("/proc/self/mountinfo")) -> CgroupRoot | None:
        """The build cgroup parents on this host, or None (not root, a
        controller missing or not on cgroup v1, or not writable)."""
        if os.geteuid() != 0:
            return None
        try:
            mounts = _v1_mounts(mountinfo.read_text())
        except OSError:
            return None
        parents: dict[str, Path] = {}
        for name in CONTROLLERS:
            if name not in mounts:
                return None
            parent = mounts[name] / GROUP_DIR
            try:
                parent.mkdir(exist_ok=True)
            except OSError as exc:
                log.info("no per-build cgroups: cannot create %s: %s", parent, exc)
                return None
            parents[name] = parent
        return cls(parents)

    def create(self, slot: int, limits: Limits) -> BuildCgroup:
        """Make the cgroups of the build in ``slot`` with ``limits``
        applied. The caller must hold the slot. Raises ``OSError`` when the
        kernel refuses, having removed what it made."""
        name = f"slot-{slot}"
        group = BuildCgroup({key: parent / name for key, parent in self.parents.items()})
        try:
            for path in group.unique_dirs:
                if path.exists():  # left by a runner that died
                    group.kill_all()
                    group.remove()
                # With its parent: another launcher may have just removed it.
                path.mkdir(parents=True)
            memory = group.dirs["memory"]
            if limits.memory_mb:
                (memory / "memory.limit_in_bytes").write_text(str(limits.memory_mb * _MiB))
                # Not one byte more with swap: memsw is memory plus swap.
                memsw = memory / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(limits.memory_mb * _MiB))
            if limits.max_processes:
                (group.dirs["pids"] / "pids.max").write_text(str(limits.max_processes))
        except OSError:
            group.remove(timeout=0.5)
            raise
        return group

    def close(self) -> None:
        """Remove the parent directories if no build uses them any more."""
        for parent in self.parents.values():
            with contextlib.suppress(OSError):
                parent.rmdir()  # refused while a build's cgroup is in it


@dataclass(frozen=True)
class BuildCgroup:
    """The cgroups of one build, by controller."""

    dirs: dict[str, Path]

    @property
    def unique_dirs(self) -> list[Path]:
        """The directories, once each (controllers may share a hierarchy)."""
        return list(dict.fromkeys(self.dirs.values()))

    @property
    def procs_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.unique_dirs]

    def pids(self) -> list[int]:
        """Every process in the build (from the pids hierarchy)."""
        try:
            text = (self.dirs["pids"] / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(line) for line in text.split()]

    def oom_kills(self) -> int:
        """Processes the kernel killed for exceeding the memory limit."""
        return _keyed(self.dirs["memory"] / "memory.oom_control").get("oom_kill", 0)

    def process_limit_hits(self) -> int:
        """Forks refused because the build had its maximum of processes."""
        return _keyed(self.dirs["pids"] / "pids.events").get("max", 0)

    def cpu_seconds(self) -> float:
        """CPU time used by the build so far, all processes together."""
        try:
            return int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return 0.0

    def kill_all(self, rounds: int = 20) -> None:
        """SIGKILL every process of the build; repeat while new ones appear
        (a fork racing the kill), at most ``rounds`` times."""
        for _ in range(rounds):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def remove(self, timeout: float = 5.0) -> bool:
        """Remove the cgroups once their last process is gone (killed ones
        take a moment to be reaped). Returns False, and leaves them for
        the next build of the slot, if that takes longer than ``timeout``
        seconds."""
        deadline = time.monotonic() + timeout
        for path in self.unique_dirs:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.warning("could not remove cgroup %s: %s", path, exc)
                        return False
                    time.sleep(0.01)
        return True


def _keyed(path: Path) -> dict[str, int]:
    """A cgroup file of ``key value`` lines."""
    values: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def _v1_mounts(mountinfo: str) -> dict[str, Path]:
    """controller -> mount point of its cgroup v1 hierarchy."""
    found: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 4 or fields[sep + 1] != "cgroup":
            continue
        for option in fields[sep + 3].split(","):
            if option in CONTROLLERS:
                found.setdefault(option, Path(fields[4]))
    return found
