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
workspace is then a filesystem of its own, ext4 in a sparse file of exactly
the limit, and a write past it fails with ENOSPC. The job mounts it in a
mount namespace of its own (see ``local._SHIM``) and unlinks the file, so
the mount and its space vanish with the job's last process, whatever
happens to the runner: nothing is ever left mounted on the host. The runner
keeps a descriptor of the filesystem's root (``attach``) to look inside and
measure it, also after the job ended. Without a hard limit, the launcher
measures the tree now and then and kills a build over the limit, which can
overshoot by whatever the build writes between two measurements.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
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
        and all(shutil.which(tool) for tool in ("mkfs.ext4", "mount", "unshare"))
    )


class Workspace:
    """One build's workspace. Methods block (file system work, mkfs): call
    them in a thread. The caller must ``remove`` it after the job."""

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
        self.image: Path | None = None
        self.hard_limit = hard_limit and limit_mb > 0
        self._root_fd: int | None = None

    @property
    def tmp(self) -> Path:
        return self.path / ".conveyor" / "tmp"

    @property
    def var_tmp(self) -> Path:
        return self.path / ".conveyor" / "var-tmp"

    @property
    def mounted(self) -> bool:
        """Whether the runner holds the job's workspace filesystem."""
        return self._root_fd is not None

    @property
    def view(self) -> Path:
        """Where the runner sees the workspace's contents: the job's own
        filesystem once attached, else the directory on the host."""
        if self._root_fd is not None:
            return Path(f"/proc/self/fd/{self._root_fd}")
        return self.path

    def create(self, script: str) -> None:
        """Make the workspace afresh (a retry reuses the build id) with the
        build script in ``.conveyor/build.sh``; with a hard limit, as the
        content of a new filesystem image (``self.image``) for the job to
        mount, leaving an empty directory to mount it on. Raises ``OSError``."""
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.work_root.chmod(0o711)
        if self.path.exists() or self.path.is_symlink():
            _remove_tree(self.path)
        self.path.mkdir(mode=0o700)
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
        if self.hard_limit:
            self.image = self._make_image()
            if self.image is not None:
                for child in self.path.iterdir():
                    _remove_tree(child)

    def _make_image(self) -> Path | None:
        """A filesystem image of ``limit_mb`` holding the workspace as it is
        now. None, with a warning, when the host refuses."""
        image = self.work_root / f".{self.path.name}.img"
        owner = f"{self.owner[0]}:{self.owner[1]}" if self.owner else "0:0"
        try:
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.limit_mb * _MiB)
            finally:
                os.close(fd)
            _run(
                "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
                "-E", f"nodiscard,root_owner={owner}", "-L", "workspace",
                "-d", str(self.path), str(image),
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning(
                "workspace %s gets no hard size limit (%s); measuring its size instead",
                self.path, exc,
            )  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
            self.hard_limit = False
            return None
        return image

    def attach(self, pid: int) -> None:
        """Hold the root of the filesystem the job ``pid`` mounted on the
        workspace. Raises ``OSError`` when there is none (the job is gone)."""
        fd = os.open(f"/proc/{pid}/root{self.path}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if os.fstat(fd).st_dev == os.stat(self.path).st_dev:
            os.close(fd)
            raise OSError(f"no filesystem is mounted on {self.path} in process {pid}")
        self._root_fd = fd

    def used_bytes(self) -> int:
        """Bytes the workspace uses now."""
        if self._root_fd is not None:
            st = os.fstatvfs(self._root_fd)
            return (st.f_blocks - st.f_bfree) * st.f_frsize
        return _tree_size(self.path)

    def is_full(self) -> bool:
        """Whether a hard-limited workspace has no room left."""
        if self._root_fd is None:
            return False
        st = os.fstatvfs(self._root_fd)
        return st.f_bavail * st.f_frsize < _FULL_MARGIN

    def remove(self, *, keep: bool) -> None:
        """Let go of the workspace: its filesystem (freed once the job's
        processes are gone too) and, unless ``keep``, the directory."""
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
        if self.image is not None:
            with contextlib.suppress(FileNotFoundError):
                self.image.unlink()  # the job never mounted it
        if not keep:
            _remove_tree(self.path)


def sweep(work_root: Path, older_than: float = 600.0) -> None:
    """Delete filesystem images a runner that died left behind between
    making them and its job mounting them (a matter of milliseconds, so an
    image ``older_than`` seconds is stale)."""
    stale_before = time.time() - older_than
    with contextlib.suppress(OSError):
        for image in work_root.glob(".*.img"):
            with contextlib.suppress(OSError):
                if image.stat().st_mtime < stale_before:
                    log.info("removing workspace image %s left by an earlier runner", image)
                    image.unlink()


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
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
