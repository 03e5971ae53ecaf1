"""A build's workspace on the host, and its size limit.

Layout under the runner's work root (mode 0711: a build uid may traverse it
to reach its own workspace, but nobody but root may list it)::

    <work root>/<build id>/             0700, the build's uid: /workspace
    <work root>/<build id>/.conveyor/   build.sh, HOME of the build
                          .conveyor/tmp       the sandbox's /tmp
                          .conveyor/var-tmp   the sandbox's /var/tmp

/tmp lives in the workspace so that it counts against the workspace limit
rather than the host's memory (a tmpfs would).

The limit is hard when the runner is root and has loop devices: the
workspace is then a filesystem of its own (ext4 in a sparse file of exactly
the limit, unlinked as soon as it is mounted, so its space comes back when
it is unmounted) and a write past the limit fails with ENOSPC. Otherwise the
launcher measures the tree now and then and kills a build over the limit,
which can overshoot by whatever the build writes between two measurements.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

_MiB = 1024 * 1024
# Below this the workspace counts as full: ext4 refuses a write with a few
# blocks still free (they are held back for metadata).
_FULL_MARGIN = 256 * 1024
_COMMAND_TIMEOUT = 60


def hard_limits_available() -> bool:
    """Whether workspaces can be size-limited filesystems on this host."""
    return (
        os.geteuid() == 0
        and os.path.exists("/dev/loop-control")
        and shutil.which("mkfs.ext4") is not None
        and shutil.which("mount") is not None
        and shutil.which("umount") is not None
    )


class Workspace:
    """One build's workspace. Every method blocks (file system work,
    ``mount``): call them in a thread."""

    def __init__(
        self,
        work_root: Path,
        build_id: str,
        *,
        limit_mb: int,
        owner: tuple[int, int] | None,
        hard_limit: bool,
    ) -> None:
        self.work_root = work_root
        self.path = work_root / build_id
        self.limit_mb = limit_mb
        self.owner = owner
        self.hard_limit = hard_limit and limit_mb > 0
        self.mounted = False

    @property
    def tmp(self) -> Path:
        return self.path / ".conveyor" / "tmp"

    @property
    def var_tmp(self) -> Path:
        return self.path / ".conveyor" / "var-tmp"

    def create(self, script: str) -> None:
        """Make the workspace afresh (a retry reuses the build id) with the
        build script in ``.conveyor/build.sh``. Raises ``OSError``."""
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.work_root.chmod(0o711)
        if self.path.exists() or self.path.is_symlink():
            _unmount(self.path)
            _remove_tree(self.path)
        self.path.mkdir(mode=0o700)
        if self.hard_limit:
            self.mounted = self._mount_filesystem()
        self.path.chmod(0o700)
        conveyor = self.path / ".conveyor"
        conveyor.mkdir(mode=0o700)
        self.tmp.mkdir(mode=0o700)
        self.var_tmp.mkdir(mode=0o700)
        script_path = conveyor / "build.sh"
        script_path.write_text(script)
        if self.owner:
            uid, gid = self.owner
            for path in (self.path, conveyor, self.tmp, self.var_tmp, script_path):
                os.chown(path, uid, gid, follow_symlinks=False)

    def _mount_filesystem(self) -> bool:
        """Mount a fresh filesystem of ``limit_mb`` on the workspace.
        Returns False, with a warning, when the host refuses."""
        image = self.work_root / f".{self.path.name}.img"
        try:
            with open(image, "wb") as handle:
                handle.truncate(self.limit_mb * _MiB)
            owner = f"{self.owner[0]}:{self.owner[1]}" if self.owner else "0:0"
            _run(
                "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
                "-E", f"nodiscard,root_owner={owner}", "-L", "workspace", str(image),
            )  # fmt: skip
            _run(
                "mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime",
                str(image), str(self.path),
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning(
                "workspace %s gets no hard size limit (%s); measuring its size instead",
                self.path, exc,
            )  # fmt: skip
            return False
        finally:
            # Mounted, the loop device holds the file; unlinked, its space
            # is freed with the last reference, whatever happens to us.
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
        with contextlib.suppress(OSError):
            (self.path / "lost+found").rmdir()
        return True

    def used_bytes(self) -> int:
        """Bytes the workspace uses now."""
        if self.mounted:
            st = os.statvfs(self.path)
            return (st.f_blocks - st.f_bfree) * st.f_frsize
        return _tree_size(self.path)

    def is_full(self) -> bool:
        """Whether a hard-limited workspace has no room left."""
        if not self.mounted:
            return False
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < _FULL_MARGIN

    def remove(self, *, keep: bool) -> None:
        """Unmount and delete the workspace; with ``keep``, leave it (and
        its mount) for inspection until this build id is launched again or
        the launcher starts anew."""
        if keep:
            return
        if self.mounted:
            _unmount(self.path)
            self.mounted = False
        _remove_tree(self.path)


def sweep(work_root: Path) -> None:
    """Unmount and delete workspaces a previous runner left mounted under
    ``work_root`` (it died before cleaning up). Call it before the first
    launch; one runner per work root."""
    root = work_root.resolve()
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = Path(fields[4].replace("\\040", " "))
        if point.parent == root:
            log.info("removing workspace %s left mounted by an earlier runner", point)
            _unmount(point)
            _remove_tree(point)


def _unmount(path: Path) -> None:
    if not os.path.ismount(path):
        return
    try:
        _run("umount", str(path))
    except (OSError, subprocess.SubprocessError):
        # Busy (a process not yet reaped): detach it now, the kernel
        # finishes the unmount when the last user is gone.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run("umount", "-l", str(path))


def _remove_tree(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
        return
    shutil.rmtree(path, ignore_errors=True)


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT)
    if done.returncode != 0:
        raise subprocess.SubprocessError(
            f"{argv[0]} exited with {done.returncode}: {done.stderr.strip()}"
        )


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total
