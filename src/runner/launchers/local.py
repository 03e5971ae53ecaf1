"""The local launcher: each build in a bubblewrap sandbox on this host.

The sandbox runs as an unprivileged host uid (root inside is not root
outside), sees the host's /usr and /etc read-only, a private /tmp, and its
own workspace as the only writable path; other workspaces, the runner's work
directory and the control plane's data directory are simply not mounted.
Resource limits are rlimits set before exec, plus a workspace-size watchdog.
Without bubblewrap it falls back to a plain subprocess, with a loud warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil

from runner.launchers.base import JobResult, JobSpec, LaunchError, Limits, OutputLine, Stream

log = logging.getLogger(__name__)

BUILD_USER = "conveyor-build"
READ_CHUNK = 64 * 1024
MAX_LINE = 64 * 1024
FALLBACK_WARNING = (
    "bubblewrap (bwrap) is not installed: this build ran as a plain subprocess"
    " WITHOUT a sandbox; install bubblewrap on the build host"
)
_WATCH_INTERVAL = 2.0


def _build_identity() -> tuple[int, int] | None:
    """The uid/gid builds run as when the runner is root: a dedicated user,
    created on first use. None when the runner is already unprivileged."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(BUILD_USER)
    except KeyError:
        import subprocess

        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", BUILD_USER],
            check=False,
            capture_output=True,
        )
        try:
            entry = pwd.getpwnam(BUILD_USER)
        except KeyError:
            entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _prlimit(limits: Limits) -> list[str]:
    """The ``prlimit`` prefix that applies ``limits`` to the job.

    rlimits are set by prlimit(1) rather than a ``preexec_fn``: Python code
    between fork and exec is unsafe in a process with gRPC's threads.
    """
    mb = 1024 * 1024
    argv = ["prlimit", "--core=0"]
    if limits.memory_mb:
        argv.append(f"--as={limits.memory_mb * mb}")
    if limits.cpu_seconds:
        argv.append(f"--cpu={limits.cpu_seconds}")
    if limits.max_processes:
        argv.append(f"--nproc={limits.max_processes}")
    if limits.workspace_mb:
        argv.append(f"--fsize={limits.workspace_mb * mb}")
    return [*argv, "--"]


class LocalJob:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        workspace: Path,
        limits: Limits,
        keep_workspace: bool,
        warning: str | None,
    ) -> None:
        self.proc = proc
        self.sandboxed = warning is None
        self.workspace = workspace
        self.limits = limits
        self.keep_workspace = keep_workspace
        self.warning = warning
        self._queue: asyncio.Queue[OutputLine | None] = asyncio.Queue(maxsize=10_000)
        self._pumps = [
            asyncio.create_task(self._pump(proc.stdout, "stdout")),
            asyncio.create_task(self._pump(proc.stderr, "stderr")),
        ]
        self._watchdog = asyncio.create_task(self._watch_workspace())
        self._killed = False
        self._limit_error: str | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def _pump(self, stream: asyncio.StreamReader | None, name: Stream) -> None:
        assert stream is not None
        pending = b""
        try:
            while True:
                chunk = await stream.read(READ_CHUNK)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    await self._queue.put(OutputLine(name, line))
                while len(pending) > MAX_LINE:
                    await self._queue.put(OutputLine(name, pending[:MAX_LINE]))
                    pending = pending[MAX_LINE:]
            if pending:
                await self._queue.put(OutputLine(name, pending))
        finally:
            await self._queue.put(None)

    async def output(self) -> AsyncIterator[OutputLine]:
        if self.warning:
            yield OutputLine("system", self.warning.encode())
        done = 0
        while done < len(self._pumps):
            item = await self._queue.get()
            if item is None:
                done += 1
                continue
            yield item

    async def wait(self) -> JobResult:
        code = await self.proc.wait()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._watchdog.cancel()
        if self._stopping:
            with contextlib.suppress(asyncio.CancelledError):
                self._stopping.cancel()
                await self._stopping
        if not self.keep_workspace:
            await asyncio.to_thread(shutil.rmtree, self.workspace, True)
        if self._limit_error:
            return JobResult(exit_code=None, error=self._limit_error, killed=True)
        if code < 0:
            return JobResult(exit_code=128 - code, killed=True)
        return JobResult(exit_code=code, killed=self._killed)

    async def stop(self, grace_seconds: float) -> None:
        if self.proc.returncode is not None:
            return
        self._killed = True
        self._signal(signal.SIGTERM)
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._kill_after(grace_seconds))

    async def _kill_after(self, grace: float) -> None:
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            log.info("job ignored SIGTERM for %.1f s; killing it", grace)
            self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        """SIGTERM goes to every process of the build but bubblewrap's own
        (bwrap dies of it at once, and its --die-with-parent would then
        SIGKILL the build before it could clean up). SIGKILL goes to the
        whole process group: the sandbox's init dies, and with it its pid
        namespace, including processes that left the group with setsid."""
        if sig != signal.SIGKILL and self.sandboxed:
            try:
                children = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                with contextlib.suppress(psutil.Error):
                    if child.name() != "bwrap":
                        child.send_signal(sig)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def _watch_workspace(self) -> None:
        limit = self.limits.workspace_mb * 1024 * 1024
        if not limit:
            return
        while self.proc.returncode is None:
            await asyncio.sleep(_WATCH_INTERVAL)
            used = await asyncio.to_thread(_tree_size, self.workspace)
            if used > limit:
                self._limit_error = (
                    f"workspace size limit of {self.limits.workspace_mb} MiB exceeded"
                )
                log.warning(self._limit_error)
                self._signal(signal.SIGKILL)
                return


def _ensure_traversable(path: Path) -> None:
    """Let the build user reach ``path`` (search bit only: it cannot list
    the directories on the way, so it learns nothing of their contents)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            log.info("allowing builds to traverse %s (o+x)", parent)
            parent.chmod(mode | 0o001)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class LocalLauncher:
    """Runs jobs under ``work_root/<build id>``. ``sandbox=None`` uses
    bubblewrap when it is installed; ``sandbox=False`` forces the plain
    subprocess (tests of the fallback only)."""

    name = "local"

    def __init__(
        self,
        work_root: Path,
        *,
        sandbox: bool | None = None,
        keep_workspaces: bool = False,
    ) -> None:
        self.work_root = work_root
        self.bwrap = shutil.which("bwrap") if sandbox is not False else None
        if sandbox and not self.bwrap:
            raise LaunchError("bubblewrap (bwrap) is required but not installed")
        if not self.bwrap:
            log.warning(FALLBACK_WARNING)
        self.keep_workspaces = keep_workspaces
        self.identity = _build_identity()
        self.prlimit = shutil.which("prlimit")
        if not self.prlimit:
            log.warning("prlimit (util-linux) is missing: builds run without rlimits")

    @property
    def sandboxed(self) -> bool:
        return self.bwrap is not None

    async def launch(self, spec: JobSpec) -> LocalJob:
        began = time.perf_counter()
        workspace = self.work_root / spec.build_id
        try:
            await asyncio.to_thread(self._prepare, workspace, spec.script)
            argv = self._argv(spec, workspace)
            env = {**spec.env, **spec.secret_env}
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=workspace,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                user=self.identity[0] if self.identity else None,
                group=self.identity[1] if self.identity else None,
                extra_groups=[] if self.identity else None,
            )
        except OSError as exc:
            raise LaunchError(f"could not start the sandbox: {exc}") from exc
        log.debug("job started in %.1f ms", (time.perf_counter() - began) * 1000)
        return LocalJob(
            proc,
            workspace,
            spec.limits,
            self.keep_workspaces,
            None if self.bwrap else FALLBACK_WARNING,
        )

    def _prepare(self, workspace: Path, script: str) -> None:
        self.work_root.mkdir(parents=True, exist_ok=True)
        if self.identity:
            _ensure_traversable(self.work_root)
        # Others may traverse the root (the build uid must reach its own
        # workspace) but not list it, so builds cannot find each other.
        self.work_root.chmod(0o711)
        if workspace.exists():
            shutil.rmtree(workspace)
        workspace.mkdir(mode=0o700)
        (workspace / ".conveyor").mkdir(mode=0o700)
        script_path = workspace / ".conveyor" / "build.sh"
        script_path.write_text(script)
        if self.identity:
            uid, gid = self.identity
            for path in (workspace, workspace / ".conveyor", script_path):
                os.chown(path, uid, gid)

    def _argv(self, spec: JobSpec, workspace: Path) -> list[str]:
        script = ".conveyor/build.sh"
        limits = _prlimit(spec.limits) if self.prlimit else []
        if not self.bwrap:
            return [*limits, "bash", script]
        argv = [
            self.bwrap,
            "--unshare-all",
            "--die-with-parent",
            "--ro-bind", "/usr", "/usr",
            "--ro-bind", "/etc", "/etc",
            "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib",
            "--proc", "/proc",
            "--dev", "/dev",
            "--tmpfs", "/tmp",
            "--tmpfs", "/run",
            "--dir", "/var/tmp",
            "--bind", str(workspace), "/workspace",
            "--chdir", "/workspace",
            "--hostname", "conveyor-build",
            "--setenv", "HOME", "/workspace/.conveyor",
            "--setenv", "TMPDIR", "/tmp",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
        ]  # fmt: skip
        for lib in ("/lib64", "/lib32", "/libx32"):
            if Path(lib).exists():
                argv += ["--symlink", f"usr{lib}", lib]
        if spec.network:
            argv += ["--share-net"]
        for path in spec.local_paths:
            if Path(path).exists():
                argv += ["--ro-bind", path, path]
        return [*limits, *argv, "--", "bash", script]

    async def close(self) -> None:
        return None
