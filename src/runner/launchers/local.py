"""The local launcher: each build in a bubblewrap sandbox on this host.

What a build gets, and what stands between it and the host:

- Identity: as root, the runner runs every build as a uid of its own,
  ``conveyor-build-<slot>`` (``build_users``): not root, and not shared with
  any other build that runs at the same time. Run unprivileged, the runner
  runs builds as itself.
- Files (bubblewrap, new user/mount/pid/ipc/uts/cgroup namespaces, no new
  user namespaces inside): /usr and /etc read-only (minus directories that
  hold host secrets, see ``HIDDEN_ETC``), its workspace at /workspace as the
  only writable disk path, /tmp and /var/tmp inside the workspace, a fresh
  /proc, a minimal /dev; everything else, including the runner's work
  directory, other workspaces and the control plane's data directory, is
  simply not there. The root of the sandbox is read-only.
- Environment: the job's variables (secrets included) reach the build
  through a pipe read inside the sandbox; the host-side processes (the
  shim, ``setpriv``, ``prlimit``, ``bwrap``) run with a fixed environment,
  so neither a secret nor a variable such as LD_PRELOAD ever touches the
  host side, and no secret appears on a command line.
- System calls: a seccomp filter (``seccomp``, x86_64) refuses the calls a
  build never needs and an attacker often does (kernel keyring, BPF,
  io_uring, userfaultfd, modules, mounts, namespaces...) with EPERM.
- Network: with ``JobSpec.network``, a network namespace of its own with
  NAT to the outside through slirp4netns (``user_network``): the host's
  loopback services are out of reach. Without slirp4netns, the host's
  network (loopback included), with a warning at start. Without
  ``JobSpec.network``, nothing but a private loopback.
- Limits: per-build cgroups where available (``cgroups``: memory, process
  count and CPU time of the build as a whole); rlimits otherwise and as a
  backstop (memory per process only without cgroups, CPU time per process,
  processes per uid, file size); the workspace size by a filesystem of its
  own where available (``workspace``), else by measuring. Wall-clock time is
  not the launcher's business: the control plane's run deadline stops the
  build, and the runner's ``BuildRun`` has a backstop for when the control
  plane is unreachable.

No sandbox is a choice, never a fallback: without a working bubblewrap
the launcher refuses to start (``_probe``), unless the runner's operator
chose ``--sandbox none`` (``sandbox=False``). Then builds run as plain
subprocesses (still as their own uid, with the same limits), the runner's
startup log and its ``conveyor_runner_sandbox`` metric say so, and every
build's log starts with a warning.

As root, a job starts as a small shim (``_SHIM``, root, in a mount namespace
of its own when the workspace has a filesystem of its own): it mounts the
workspace, joins the build's cgroups, then ``setpriv`` drops to the build
uid for good before ``prlimit`` and ``bwrap`` run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from runner.errors import LaunchError, NetworkError
from runner.launchers import seccomp as seccomp_filter
from runner.launchers.base import JobSpec, Limits
from runner.launchers.build_users import BuildUser, BuildUsers
from runner.launchers.cgroups import CgroupRoot
from runner.launchers.local_job import Grant, LocalJob
from runner.launchers.user_network import (
    NetworkTools,
    SandboxPipes,
    UserNetwork,
    network_tools,
)
from runner.launchers.workspace import Workspace, hard_limits_available, sweep
from runner.metrics import RunnerMetrics
from runner.pipes import close_fd

log = logging.getLogger(__name__)

NO_SANDBOX_WARNING = (
    "this build ran WITHOUT a sandbox, as a plain subprocess on the build host:"
    " the runner's operator chose --sandbox none (CONVEYOR_SANDBOX=none)"
)
# How an operator who wants no sandbox says so, for the errors that refuse.
_NO_SANDBOX_HINT = (
    "; install bubblewrap (it needs unprivileged user namespaces), or run builds"
    " unsandboxed on purpose: conveyor runner start --sandbox none (CONVEYOR_SANDBOX=none)"
)
SHARED_NETWORK_WARNING = (
    "slirp4netns is not installed (or /dev/net/tun is not usable): builds with network"
    " share the host's network, loopback services included; install slirp4netns on"
    " the build host"
)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Host-side processes of a build see only this, never the job's variables.
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# /etc directories that hold secrets of services a build host commonly runs
# (this runner's own configuration among them). Their modes should already
# keep a build out; an empty directory in their place makes sure.
HIDDEN_ETC = ("conveyor", "nomad.d", "consul.d", "vault.d", "docker", "ssl/private")
_MiB = 1024 * 1024
_CPU_SLACK = 2
_SET_UP_TIMEOUT = 60.0

# The shims (runner/scripts): as root on the host before anything forks
# (mount the workspace, join the cgroups, drop to the build uid), and first
# in the sandbox (export the job's variables, put the pipes in place).
_SHIM = resources.files("runner").joinpath("scripts/shim.sh").read_text()
_LOAD_ENV = resources.files("runner").joinpath("scripts/load-env.sh").read_text()
# Where the sandbox finds the execute-only copy of bash that runs the build
# script: a process whose program its user cannot read is not dumpable, so
# a step (the same uid) cannot open its fds through /proc, ptrace it or take
# its fds with pidfd_getfd; the control channel is safe in it.
SCRIPT_SHELL = "/.conveyor/bash"


def _prlimit(limits: Limits, *, cgroup: bool) -> list[str]:
    """The ``prlimit`` prefix that applies ``limits`` to the job.

    rlimits are set by prlimit(1) rather than a ``preexec_fn``: Python code
    between fork and exec is unsafe in a process with gRPC's threads.

    With cgroups, the cgroup limits memory and processes, so there is no
    RLIMIT_AS (it limits address space, not memory, and breaks runtimes
    that reserve large ranges up front: JVM, V8, Go) and no RLIMIT_NPROC
    (it also counts the uid's exited processes that init has yet to reap);
    RLIMIT_CPU stays as a backstop a little above the limit the launcher
    enforces on the whole build, so that the build is told which limit it
    hit.
    """
    argv = ["prlimit", "--core=0"]
    if limits.memory_mb and not cgroup:
        argv.append(f"--as={limits.memory_mb * _MiB}")
    if limits.cpu_seconds:
        argv.append(f"--cpu={limits.cpu_seconds + (_CPU_SLACK if cgroup else 0)}")
    if limits.max_processes and not cgroup:
        argv.append(f"--nproc={limits.max_processes}")
    if limits.workspace_mb:
        argv.append(f"--fsize={limits.workspace_mb * _MiB}")
    return [*argv, "--"]


def _ensure_traversable(path: Path) -> None:
    """Let build users reach ``path`` (search bit only: they cannot list
    the directories on the way, so they learn nothing of their contents)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            log.info("allowing builds to traverse %s (o+x)", parent)
            parent.chmod(mode | 0o001)


def resolv_conf_args(host_resolv: Path, fd: int) -> list[str]:
    """bubblewrap arguments that put the resolver configuration on ``fd``
    where the sandbox's resolver reads it. /etc is the host's, read-only:
    where /etc/resolv.conf is a symlink (systemd-resolved:
    ../run/systemd/resolve/stub-resolv.conf), the file must appear at its
    target, and the sandbox's /run is empty, so the directory is made."""
    if not host_resolv.is_symlink():
        return ["--ro-bind-data", str(fd), "/etc/resolv.conf"]
    # Where the link leads inside the sandbox, whose /etc is the host's.
    target = Path(os.path.normpath(os.path.join("/etc", os.readlink(host_resolv))))
    return ["--dir", str(target.parent), "--ro-bind-data", str(fd), str(target)]


def own_network_tool() -> str | None:
    """slirp4netns, when this host can give builds their own network
    (``user_network.network_tools``); else None."""
    tools = network_tools()
    return tools.slirp4netns if tools else None


def _probe(bwrap: str, setpriv: str | None) -> str | None:
    """Blocking: why bubblewrap cannot sandbox a build on this host (a
    sandbox with the namespaces a build gets, as an unprivileged uid, as
    builds run), or None when it can. Costs a few milliseconds."""
    # nobody, as a build uid is: root makes namespaces where others may not.
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"] if setpriv else []
    argv = [
        *drop, bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
        "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--", "true",
    ]  # fmt: skip
    try:
        done = subprocess.run(
            argv, env=HOST_ENV, cwd="/", capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    why = done.stderr.decode(errors="replace").strip().splitlines()
    return why[-1] if why else f"it exited with {done.returncode}"


def _write_env(fd: int, env: Mapping[str, str]) -> None:
    """Blocking: write ``env`` NUL-separated to the pipe ``fd``, close it."""
    data = b"".join(f"{name}={value}".encode() + b"\0" for name, value in env.items())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass  # the job ended before reading it all; its result says why
    finally:
        os.close(fd)


def _read_ready(fd: int) -> bool:
    """Blocking: whether the shim on the other end of ``fd`` said "ready"
    before it closed the pipe or died."""
    try:
        return os.read(fd, 16) == b"ready"
    finally:
        os.close(fd)


def _read_now(fd: int, limit: int) -> bytes:
    """What the pipe ``fd`` holds now, up to ``limit`` bytes, without
    waiting for more."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, limit)
    except OSError:
        return b""


# The descriptors of one job's start (runner.launchers.local._start).
_FDS = (
    "env_read", "env_write", "out_read", "out_write", "err_read", "err_write",
    "control", "job_control", "shell", "ready_read", "ready_write", "seccomp",
)  # fmt: skip


@dataclass(frozen=True)
class _Started:
    """A started job: the runner's ends of its output and control channel."""

    proc: asyncio.subprocess.Process
    env_writer: asyncio.Task[None]
    network: UserNetwork | None
    stdout: int
    stderr: int
    control: int


class LocalLauncher:
    """Runs jobs under ``work_root/<build id>``; one runner per work root.

    ``sandbox=True`` (the default) runs builds in bubblewrap and raises
    ``LaunchError`` when it is missing or does not work here (the message
    says how to fix it); ``sandbox=False``, the operator's explicit choice
    (``--sandbox none``), runs them as plain subprocesses. ``cgroups`` and
    ``hard_workspace_limit`` likewise: None uses them when the host allows,
    False never (tests of the fallbacks), True requires them.
    ``keep_workspaces`` (debugging) leaves workspaces behind after their
    jobs; they then have no hard size limit, as theirs would vanish.
    ``seccomp`` likewise for the system-call filter (``seccomp``; x86_64
    with bubblewrap). ``metrics``, when given, counts the limits builds
    hit. ``protected``
    are more host directories no build may read through a local repository
    path (the runner's build cache, say).
    """

    name = "local"
    supports_cache = True
    control_channel = True

    def __init__(
        self,
        work_root: Path,
        *,
        sandbox: bool = True,
        keep_workspaces: bool = False,
        cgroups: bool | None = None,
        hard_workspace_limit: bool | None = None,
        metrics: RunnerMetrics | None = None,
        protected: Sequence[Path] = (),
        seccomp: bool | None = None,
        user_network: bool | None = None,
    ) -> None:
        self.work_root = work_root
        self.protected = tuple(protected)
        self.metrics = metrics
        self.keep_workspaces = keep_workspaces
        self.users: BuildUsers | None = None
        self.setpriv: str | None = None
        if os.geteuid() == 0:
            self.setpriv = shutil.which("setpriv")
            if not self.setpriv:
                raise LaunchError("a root runner needs setpriv (util-linux) to drop privileges")
            self.users = BuildUsers()
        self.bwrap: str | None = None
        if sandbox:
            self.bwrap = shutil.which("bwrap")
            if not self.bwrap:
                raise LaunchError("bubblewrap (bwrap) is not installed" + _NO_SANDBOX_HINT)
            why = _probe(self.bwrap, self.setpriv)
            if why is not None:
                raise LaunchError(f"bubblewrap does not work here ({why})" + _NO_SANDBOX_HINT)
        else:
            log.warning("builds run WITHOUT a sandbox: the operator chose --sandbox none")
        if metrics is not None:
            for mode in ("bubblewrap", "none"):
                metrics.sandbox.labels(mode).set(1 if (mode == "none") != sandbox else 0)
        self.cgroup_root = CgroupRoot.detect() if cgroups is not False else None
        if cgroups and self.cgroup_root is None:
            raise LaunchError("per-build cgroups are required but not available on this host")
        self.hard_workspace_limit = (
            hard_workspace_limit is not False and not keep_workspaces and hard_limits_available()
        )
        if hard_workspace_limit and not self.hard_workspace_limit:
            raise LaunchError("hard workspace limits need root, loop devices and mkfs.ext4")
        # The filter needs bubblewrap to load it, and a known architecture.
        self.seccomp = bool(self.bwrap) and seccomp is not False and seccomp_filter.supported()
        if seccomp and not self.seccomp:
            raise LaunchError("a seccomp filter needs bubblewrap on x86_64")
        # Builds with network get their own (slirp4netns) where installed;
        # otherwise they share the host's, loopback included.
        self.network: NetworkTools | None = None
        if self.bwrap and user_network is not False:
            self.network = network_tools()
        if user_network and not self.network:
            raise LaunchError("a network of its own per build needs bubblewrap and slirp4netns")
        if self.bwrap and not self.network and user_network is None:
            log.warning(SHARED_NETWORK_WARNING)
        if self.network and (self.network.root is None or self.network.ip is None):
            log.warning(
                "builds with network can reach link-local addresses (cloud metadata) and this"
                " host's own addresses: fencing them needs a root runner, nsenter and ip"
            )
        self.prlimit = shutil.which("prlimit")
        if not self.prlimit:
            log.warning("prlimit (util-linux) is missing: builds run without rlimits")
        self.bash = shutil.which("bash") or "/bin/bash"
        self.unshare = shutil.which("unshare") or "unshare"
        sweep(work_root)
        log.info(
            "local launcher: sandbox %s, seccomp %s, network %s, build users %s, cgroups %s,"
            " workspace limit %s",
            "bubblewrap" if self.bwrap else "NONE (the operator's choice: --sandbox none)",
            "on" if self.seccomp else "off",
            "own (slirp4netns)" if self.network else "the host's",
            "one uid per build" if self.users else "the runner's own uid",
            "v1 (memory, pids, cpuacct)" if self.cgroup_root else "none (rlimits only)",
            "hard (own filesystem)" if self.hard_workspace_limit else "measured",
        )

    @property
    def sandboxed(self) -> bool:
        return self.bwrap is not None

    async def launch(self, spec: JobSpec) -> LocalJob:
        began = time.perf_counter()
        self._check_local_paths(spec.local_paths)
        setup = asyncio.ensure_future(asyncio.to_thread(self._set_up, spec))
        try:
            grant = await asyncio.shield(setup)
        except asyncio.CancelledError:
            setup.add_done_callback(self._release_later)
            raise
        try:
            started = await self._start(spec, grant)
        except BaseException:
            self._release_soon(grant)
            raise
        log.debug(
            "job started in %.1f ms", (time.perf_counter() - began) * 1000,
            extra={"build_id": spec.build_id},
        )  # fmt: skip
        return LocalJob(
            started.proc,
            build_id=spec.build_id,
            limits=spec.limits,
            grant=grant,
            keep_workspace=self.keep_workspaces,
            warning=None if self.bwrap else NO_SANDBOX_WARNING,
            env_writer=started.env_writer,
            metrics=self.metrics,
            network=started.network,
            output_fds=(started.stdout, started.stderr),
            control_fd=started.control,
        )

    def _set_up(self, spec: JobSpec) -> Grant:
        """Blocking: take a build user, make the workspace and the cgroups.
        Undoes its own work and raises ``LaunchError`` on failure."""
        user = self.users.acquire() if self.users else None
        grant = Grant(
            Workspace(
                self.work_root,
                spec.build_id,
                limit_mb=spec.limits.workspace_mb,
                owner=(user.uid, user.gid) if user else None,
                hard_limit=self.hard_workspace_limit,
            ),
            None,
            user,
            self.users,
        )
        try:
            self._check_readable(spec.local_paths, user)
            self.work_root.mkdir(parents=True, exist_ok=True)
            if user is not None:
                _ensure_traversable(self.work_root)
            grant.workspace.create(spec.script)
            if self.cgroup_root is not None and user is not None:
                cgroup = self.cgroup_root.create(user.slot, spec.limits)
                grant = Grant(grant.workspace, cgroup, user, self.users)
        except BaseException as exc:
            grant.release(keep_workspace=False)
            if isinstance(exc, OSError):
                raise LaunchError(f"could not prepare the sandbox: {exc}") from exc
            raise
        return grant

    async def _start(self, spec: JobSpec, grant: Grant) -> _Started:
        """Start the job, wait for its shim to have set it up, give it its
        network, hand it its environment. Raises ``LaunchError``; the caller
        releases ``grant``."""
        workspace, user = grant.workspace, grant.user
        fd = dict.fromkeys(_FDS, -1)
        net: SandboxPipes | None = None
        try:
            fd["env_read"], fd["env_write"] = os.pipe()
            fd["out_read"], fd["out_write"] = os.pipe()
            fd["err_read"], fd["err_write"] = os.pipe()
            # A socket, not a pipe: /proc/<pid>/fd cannot reopen a socket.
            fd["control"], fd["job_control"] = (end.detach() for end in socket.socketpair())
            if self.bwrap:
                fd["shell"] = os.open(self.bash, os.O_RDONLY | os.O_CLOEXEC)
            if user is not None:
                fd["ready_read"], fd["ready_write"] = os.pipe()
            if self.seccomp:
                fd["seccomp"] = seccomp_filter.filter_fd()
            if self.network is not None and spec.network:
                net = SandboxPipes()
        except OSError as exc:
            for number in fd.values():
                close_fd(number)
            raise LaunchError(f"could not prepare the sandbox: {exc}") from exc
        # The job's ends: closed here once it started (it holds its copies).
        jobs = ("env_read", "ready_write", "seccomp", "job_control", "shell")
        pass_fds = tuple(fd[name] for name in jobs if fd[name] >= 0) + (spec.cache_fds or ())
        pass_fds += net.child_fds() if net else ()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(spec, grant, fd, net),
                cwd=workspace.path,
                env=HOST_ENV,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd["out_write"],
                stderr=fd["err_write"],
                pass_fds=pass_fds,
                start_new_session=True,
            )
        except BaseException as exc:
            for name in _FDS:
                if name not in jobs:
                    fd[name] = close_fd(fd[name])
            if net is not None:
                net.close()
            if isinstance(exc, OSError):
                raise LaunchError(f"could not start the sandbox: {exc}") from exc
            raise
        finally:
            for name in (*jobs, "out_write", "err_write"):
                fd[name] = close_fd(fd[name])
            if net is not None:
                net.close_child_ends()
        network: UserNetwork | None = None
        try:
            if user is not None:
                await self._await_shim(proc, fd["ready_read"], fd["err_read"], workspace)
            if net is not None:
                network = await self._give_network(net, user, spec.build_id)
        except BaseException:
            for name in ("env_write", "out_read", "err_read", "control"):
                fd[name] = close_fd(fd[name])
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            if net is not None:
                net.close()
        env = {"PATH": DEFAULT_PATH, **spec.env, **spec.secret_env, **self._forced_env(workspace)}
        writer = asyncio.create_task(asyncio.to_thread(_write_env, fd["env_write"], env))
        return _Started(proc, writer, network, fd["out_read"], fd["err_read"], fd["control"])

    async def _give_network(
        self, net: SandboxPipes, user: BuildUser | None, build_id: str
    ) -> UserNetwork:
        """Attach slirp4netns to the sandbox once it is set up. Raises
        ``LaunchError``; the caller closes ``net``."""
        assert self.network is not None
        network = UserNetwork(self.network, (user.uid, user.gid) if user else None, HOST_ENV)
        try:
            pid = await asyncio.wait_for(asyncio.to_thread(net.sandbox_pid), _SET_UP_TIMEOUT)
            await network.start(pid, build_id)
        except TimeoutError:
            await network.close()
            raise LaunchError(
                f"the sandbox was not set up within {_SET_UP_TIMEOUT:.0f} s"
            ) from None
        except NetworkError as exc:
            await network.close()
            raise LaunchError(f"could not set up the build's network: {exc}") from exc
        return network

    async def _await_shim(
        self, proc: asyncio.subprocess.Process, ready_read: int, err_read: int, workspace: Workspace
    ) -> None:
        """Wait for the shim's word; then hold the workspace filesystem it
        mounted. The job cannot end before: it waits for its environment."""
        try:
            ready = await asyncio.wait_for(
                asyncio.to_thread(_read_ready, ready_read), _SET_UP_TIMEOUT
            )
        except TimeoutError:
            raise LaunchError(
                f"the sandbox was not set up within {_SET_UP_TIMEOUT:.0f} s"
            ) from None
        if not ready:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            why = _read_now(err_read, 4096).decode(errors="replace").strip()
            raise LaunchError(f"could not set up the sandbox: {why or 'the shim failed'}")
        if workspace.image is not None:
            await asyncio.to_thread(workspace.attach, proc.pid)

    def _release_soon(self, grant: Grant) -> None:
        """Release a failed launch's grant in a thread, without waiting."""
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, lambda: grant.release(keep_workspace=False))

    def _release_later(self, setup: asyncio.Future[Grant]) -> None:
        """The launch was cancelled while its set-up ran in a thread, which
        carried on: release what it made once it is done."""
        if not setup.cancelled() and setup.exception() is None:
            self._release_soon(setup.result())

    def _check_local_paths(self, paths: Sequence[str]) -> None:
        """A local repository path must not expose the runner's work
        directory (other builds' workspaces) or anything above it, such as
        the data directory of `conveyor up`, or a ``protected`` directory.
        Raises ``LaunchError``."""
        for root in (self.work_root.resolve(), *(p.resolve() for p in self.protected)):
            for raw in paths:
                real = Path(raw).resolve()
                if real == root or root in real.parents or real in root.parents:
                    raise LaunchError(
                        f"the repository path {raw} overlaps the runner's directory {root};"
                        " builds may not read it"
                    )

    def _check_readable(self, paths: Sequence[str], user: BuildUser | None) -> None:
        """Blocking: raise ``LaunchError`` saying what to do when the build
        user cannot read a local repository path (a home directory is 0700):
        bubblewrap would fail to bind it, and the build would end with a
        puzzling sandbox error. A path that does not exist is git's to
        report. As root, asks ``test`` running as the build user (it counts
        ACLs and every directory above the path)."""
        for raw in paths:
            if not Path(raw).exists():
                continue
            if user is None:
                readable = os.access(raw, os.R_OK | os.X_OK)
            else:
                assert self.setpriv is not None
                argv = [
                    self.setpriv, f"--reuid={user.uid}", f"--regid={user.gid}",
                    "--clear-groups", "--", "test", "-r", raw, "-a", "-x", raw,
                ]  # fmt: skip
                try:
                    done = subprocess.run(argv, env=HOST_ENV, cwd="/", timeout=30, check=False)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise LaunchError(f"could not check access to {raw}: {exc}") from exc
                readable = done.returncode == 0
            if not readable:
                uid = user.uid if user is not None else os.getuid()
                raise LaunchError(
                    f"the build user cannot read {raw}: make it readable to uid {uid}"
                    " (o+rX on the repository, o+x on every directory above it),"
                    " or serve it over git/ssh/https"
                )

    def _forced_env(self, workspace: Workspace) -> dict[str, str]:
        if self.bwrap:
            return {"HOME": "/workspace/.conveyor", "TMPDIR": "/tmp"}
        return {"HOME": str(workspace.path / ".conveyor"), "TMPDIR": str(workspace.tmp)}

    def _argv(
        self, spec: JobSpec, grant: Grant, fd: Mapping[str, int], net: SandboxPipes | None
    ) -> list[str]:
        prefix: list[str] = []
        workspace, cgroup, user = grant.workspace, grant.cgroup, grant.user
        if user is not None:
            assert self.setpriv is not None
            image = str(workspace.image) if workspace.image else ""
            files = [str(path) for path in cgroup.procs_files] if cgroup else []
            if image:
                prefix = [self.unshare, "--mount", "--propagation", "private", "--"]
            prefix += [
                self.bash, "--noprofile", "--norc", "-c", _SHIM, "shim",
                image, str(workspace.path), str(fd["ready_write"]), str(len(files)), *files,
                self.setpriv, f"--reuid={user.uid}", f"--regid={user.gid}",
                "--clear-groups", "--inh-caps=-all", "--",
            ]  # fmt: skip
        if self.prlimit:
            prefix += _prlimit(spec.limits, cgroup=cgroup is not None)
        cache_in, cache_out = (str(n) for n in spec.cache_fds) if spec.cache_fds else ("-", "-")
        load_env = [
            self.bash, "--noprofile", "--norc", "-c", _LOAD_ENV, "load-env",
            str(fd["env_read"]), cache_in, cache_out, str(net.up_write) if net else "-",
            str(fd["job_control"]),
        ]  # fmt: skip
        if not self.bwrap:
            return [*prefix, *load_env, self.bash, ".conveyor/build.sh"]
        sandbox = self._bwrap(spec, workspace, fd, net)
        return [*prefix, *sandbox, "--", *load_env, SCRIPT_SHELL, ".conveyor/build.sh"]

    def _bwrap(
        self, spec: JobSpec, workspace: Workspace, fd: Mapping[str, int], net: SandboxPipes | None
    ) -> list[str]:
        assert self.bwrap is not None
        # As Docker does, 64 MiB; less with a small memory limit, which
        # /dev/shm counts against, so that a full /dev/shm leaves room to run.
        shm_mb = min(64, spec.limits.memory_mb // 2) if spec.limits.memory_mb else 64
        argv = [
            self.bwrap,
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",  # nested user namespaces: much kernel surface
            "--die-with-parent",
            "--ro-bind", "/usr", "/usr",
            "--ro-bind", "/etc", "/etc",
        ]  # fmt: skip
        for hidden in HIDDEN_ETC:
            if Path("/etc", hidden).is_dir():
                argv += ["--tmpfs", f"/etc/{hidden}", "--remount-ro", f"/etc/{hidden}"]
        argv += [
            "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib",
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(shm_mb * _MiB), "--tmpfs", "/dev/shm",
            "--size", str(16 * _MiB), "--tmpfs", "/run",
            "--bind", str(workspace.path), "/workspace",
            "--bind", str(workspace.tmp), "/tmp",
            "--bind", str(workspace.var_tmp), "/var/tmp",
            "--chdir", "/workspace",
            "--hostname", "conveyor-build",
        ]  # fmt: skip
        for lib in ("/lib64", "/lib32", "/libx32"):
            if Path(lib).exists():
                argv += ["--symlink", f"usr{lib}", lib]
        resolv = Path("/etc/resolv.conf").resolve()
        if net is not None:
            # A network namespace of its own, which slirp4netns connects
            # once bubblewrap has said which process is in it.
            argv += resolv_conf_args(Path("/etc/resolv.conf"), net.resolv_read)
            argv += ["--info-fd", str(net.info_write)]
        elif spec.network:
            argv += ["--share-net"]
            # systemd-resolved: the real file lives under /run, which the
            # sandbox replaces; without it the build has no DNS.
            if resolv.is_relative_to("/run") and resolv.exists():
                argv += ["--ro-bind", str(resolv), str(resolv)]
        for path in spec.local_paths:
            real = Path(path).resolve()
            if real.exists():
                argv += ["--ro-bind", str(real), path]
        # Mode 0111: its user may run it but not read it (see SCRIPT_SHELL).
        argv += ["--perms", "0111", "--ro-bind-data", str(fd["shell"]), SCRIPT_SHELL]
        if fd["seccomp"] >= 0:
            argv += ["--seccomp", str(fd["seccomp"])]
        # Last: everything above is mounted, nothing else may be created.
        argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
        return argv

    async def close(self) -> None:
        if self.cgroup_root is not None:
            await asyncio.to_thread(self.cgroup_root.close)
