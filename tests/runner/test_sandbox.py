"""The sandbox-escape table of the local launcher.

Each row is something a hostile build tries, run for real through
LocalLauncher with bubblewrap on this host, and asserts both that the
attempt was blocked and that the host was left unharmed. The host side is
laid out like `conveyor up`: a data directory (0711) holding conveyor.json
(0600, the admin token) and postgres/ (0700), with the runner's workspaces
inside it.

Rows that need the runner to be root (one uid per build, cgroups, hard
workspace limits) are skipped, saying so, when the suite runs unprivileged.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from runner.launchers import seccomp as seccomp_filter
from runner.launchers.base import JobResult, JobSpec, LaunchError, Limits, OutputLine
from runner.launchers.local import (
    HIDDEN_ETC,
    SHARED_NETWORK_WARNING,
    LocalLauncher,
    own_network_tool,
    resolv_conf_args,
)
from runner.launchers.local_job import LocalJob
from runner.launchers.user_network import RESOLV_CONF, TUN, fence_tools
from runner.metrics import RunnerMetrics
from runner.pipes import data_fd
from tests.helpers import host_address, outside_target

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs a root runner (one uid per build)")


@dataclass(frozen=True)
class Host:
    data_dir: Path
    token: str
    work_root: Path


@pytest.fixture
def host(build_dir: Path) -> Host:
    """The data directory of `conveyor up`, with the runner's work root in it."""
    data = build_dir / "data"
    data.mkdir()
    data.chmod(0o711)
    token = f"cvy_{secrets.token_urlsafe(24)}"
    fd = os.open(data / "conveyor.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"token": token, "runner_token": token}, handle)
    postgres = data / "postgres"
    postgres.mkdir(mode=0o700)
    (postgres / "pg_hba.conf").write_text(f"# {token}\nhost all all 127.0.0.1/32 trust\n")
    (postgres / "pg_hba.conf").chmod(0o600)
    return Host(data, token, data / "runner" / "workspaces")


@pytest_asyncio.fixture
async def launcher(host: Host) -> AsyncIterator[LocalLauncher]:
    local = LocalLauncher(host.work_root, sandbox=True)
    try:
        yield local
    finally:
        await local.close()


@dataclass
class Outcome:
    lines: list[OutputLine]
    result: JobResult
    seconds: float

    def text(self, stream: str) -> str:
        return "\n".join(
            ln.data.decode(errors="replace") for ln in self.lines if ln.stream == stream
        )

    @property
    def stdout(self) -> str:
        return self.text("stdout")

    @property
    def stderr(self) -> str:
        return self.text("stderr")

    @property
    def everything(self) -> str:
        return "\n".join(ln.data.decode(errors="replace") for ln in self.lines)


def job_spec(
    script: str,
    *,
    limits: Limits | None = None,
    network: bool = False,
    env: dict[str, str] | None = None,
    secret_env: dict[str, str] | None = None,
    local_paths: tuple[str, ...] = (),
) -> JobSpec:
    return JobSpec(
        build_id=uuid.uuid4().hex[:16],
        script=script,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})},
        secret_env=secret_env or {},
        limits=limits or Limits(),
        network=network,
        local_paths=local_paths,
    )


async def finish(job: LocalJob, started: float, seen: list[OutputLine] | None = None) -> Outcome:
    lines = list(seen or [])
    lines += [line async for line in job.output()]
    result = await job.wait()
    return Outcome(lines, result, time.monotonic() - started)


async def run(launcher: LocalLauncher, script: str, **kwargs: object) -> Outcome:
    started = time.monotonic()
    job = await launcher.launch(job_spec(script, **kwargs))  # type: ignore[arg-type]
    return await asyncio.wait_for(finish(job, started), 30)


async def until_ready(job: LocalJob) -> list[OutputLine]:
    """Read the job's output up to its stdout line ``ready``."""
    seen: list[OutputLine] = []
    async for line in job.output():
        seen.append(line)
        if line.stream == "stdout" and line.data == b"ready":
            return seen
    raise AssertionError(f"the job ended before it was ready: {seen}")


def survivors(job: LocalJob, ended: float) -> list[psutil.Process]:
    """Live processes of the job's uid that existed before it ``ended``
    (the uid may be handed to another build, of another test session,
    right after)."""
    found = []
    for proc in psutil.process_iter(["uids", "status", "create_time"]):
        uids = proc.info["uids"]
        if not uids or uids.real != job.uid or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if proc.info["create_time"] <= ended:
            found.append(proc)
    return found


# ---------------------------------------------------------------- host secrets

SECRET_READS = [
    pytest.param("cat /etc/shadow", "Permission denied", id="etc-shadow"),
    pytest.param("cat /etc/gshadow", "Permission denied", id="etc-gshadow"),
    pytest.param("cat {data}/conveyor.json", "No such file", id="data-dir-token-by-host-path"),
    pytest.param("cat {data}/postgres/pg_hba.conf", "No such file", id="data-dir-postgres"),
    pytest.param(
        "cat /workspace/../conveyor.json /workspace/../../conveyor.json",
        "No such file",
        id="data-dir-token-by-dot-dot",
    ),
    pytest.param("cat /proc/1/root{data}/conveyor.json", "No such file", id="via-proc-1-root"),
    pytest.param(
        "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done; env",
        None,
        id="runner-token-in-environments",
    ),
]


@pytest.mark.parametrize(("attempt", "refusal"), SECRET_READS)
async def test_reading_a_host_secret_is_refused(
    launcher: LocalLauncher,
    host: Host,
    monkeypatch: pytest.MonkeyPatch,
    attempt: str,
    refusal: str | None,
) -> None:
    # The runner's own environment holds its token: a build must not see it.
    monkeypatch.setenv("CONVEYOR_RUNNER_TOKEN", host.token)
    script = f"{attempt.format(data=host.data_dir)} && echo LEAKED\nexit 0\n"
    out = await run(launcher, script)
    assert out.result.exit_code == 0, out.everything
    assert "LEAKED" not in out.stdout or refusal is None
    assert host.token not in out.everything
    if refusal is not None:
        assert refusal in out.stderr, out.everything


def hidden_here() -> list[str]:
    """The directories of HIDDEN_ETC this host has."""
    return [name for name in HIDDEN_ETC if Path("/etc", name).is_dir()]


async def test_directories_of_host_secrets_in_etc_are_empty_in_the_sandbox(
    launcher: LocalLauncher,
) -> None:
    hidden = hidden_here()
    if not hidden:
        pytest.skip(f"none of {HIDDEN_ETC} exists in this host's /etc")
    script = "".join(
        f'echo "{name} $(stat -f -c %T /etc/{name}) $(ls -A /etc/{name} | wc -l)"\n'
        for name in hidden
    )
    out = await run(launcher, script)
    assert out.stdout.splitlines() == [f"{name} tmpfs 0" for name in hidden], out.everything


# ------------------------------------------------------- writes outside /workspace

WRITE_TARGETS = [
    pytest.param("/usr", True, id="usr"),
    pytest.param("/etc", True, id="etc"),
    pytest.param("/", True, id="root"),
    pytest.param("/home", True, id="home"),
    pytest.param("/var", True, id="var"),
    pytest.param("/proc/sys/kernel", True, id="proc-sys"),
    pytest.param("/workspace/..", True, id="workspace-parent"),
    # Host paths under /tmp here: in the sandbox they may land in its
    # private /tmp, which is the workspace's. The host must not see them.
    pytest.param("{work_root}", False, id="work-root-by-host-path"),
    pytest.param("{data}", False, id="data-dir-by-host-path"),
]


def host_paths(*sandbox_paths: str) -> list[Path]:
    """Where the sandbox paths would be on the host, if they escaped."""
    return [Path(os.path.normpath(path)) for path in sandbox_paths]


@pytest.mark.parametrize(("directory", "refused_inside"), WRITE_TARGETS)
async def test_writing_outside_the_workspace_is_refused(
    launcher: LocalLauncher, host: Host, directory: str, refused_inside: bool
) -> None:
    where = directory.format(work_root=host.work_root, data=host.data_dir)
    name = f"escape-{uuid.uuid4().hex[:8]}"
    target = f"{where}/{name}"
    script = (
        f"echo pwned > {target} && echo WROTE\n"
        f"mkdir -p {target}.d && echo WROTE\n"
        f"ln -s /workspace {target}.l && echo WROTE\n"
        "exit 0\n"
    )
    on_host = host_paths(target, f"{target}.d", f"{target}.l")
    try:
        out = await run(launcher, script)
    finally:
        leaked = [p for p in on_host if p.exists() or p.is_symlink()]
        for path in leaked:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
    assert not leaked, "a write reached the host"
    assert out.result.exit_code == 0, out.everything
    if refused_inside:
        assert "WROTE" not in out.stdout, out.everything
        assert out.stderr.count("Read-only file system") + out.stderr.count("No such file") >= 3


# ------------------------------------------------------------------ identity


async def test_root_in_the_sandbox_is_not_host_root(launcher: LocalLauncher) -> None:
    script = (
        "id -u; touch made; mkdir dir\n"
        "setpriv --reuid=0 --regid=0 --clear-groups id && echo BECAME-ROOT\n"
        "echo ready; exec sleep 30\n"
    )
    started = time.monotonic()
    job = await launcher.launch(job_spec(script))
    seen = await until_ready(job)
    workspace = job.workspace.view
    made, folder = (workspace / "made").stat(), (workspace / "dir").stat()
    await job.stop(grace_seconds=0.5)
    out = await finish(job, started, seen)
    inside_uid = int(out.stdout.splitlines()[0])
    assert inside_uid != 0
    assert made.st_uid != 0
    assert folder.st_uid != 0
    assert made.st_gid != 0
    if ROOT:
        assert job.uid is not None
        assert made.st_uid == folder.st_uid == job.uid
    assert "BECAME-ROOT" not in out.stdout


PRIVILEGE_ATTEMPTS = [
    pytest.param("unshare --user --map-root-user id", id="nested-user-namespace"),
    pytest.param("unshare --mount --net true", id="new-namespaces"),
    pytest.param("mount -t tmpfs none /workspace", id="mount"),
    pytest.param("setpriv --reuid=0 id", id="setuid-0"),
    pytest.param("chroot / true", id="chroot"),
]


@pytest.mark.parametrize("attempt", PRIVILEGE_ATTEMPTS)
async def test_gaining_privileges_is_refused(launcher: LocalLauncher, attempt: str) -> None:
    out = await run(launcher, f"{attempt} && echo GAINED\necho still-here\nexit 0\n")
    assert "GAINED" not in out.stdout, out.everything
    assert out.stdout.endswith("still-here")


# ------------------------------------------------------------ other builds


# ----------------------------------------------------------- system calls

# Calls a system call by number from inside the sandbox; prints its errno
# (0 when it worked).
SYSCALL = (
    "python3 -c 'import ctypes; libc = ctypes.CDLL(None, use_errno=True);"
    ' r = libc.syscall({nr}{args}); print("errno", ctypes.get_errno() if r == -1 else 0)\''
)
DENIED_CALLS = [
    # (number, arguments, errno without the filter: None when this host's
    # settings refuse the call anyway)
    # The kernel keyring is not namespaced: a key left in the build uid's
    # keyring would reach the next build on that slot.
    pytest.param(248, 'b"user", b"conveyor", b"leak", 4, -2', 0, id="add-key"),
    pytest.param(250, "0, -2, 1, 0, 0", 0, id="keyctl"),
    # io_uring: much kernel surface, and it bypasses syscall filters.
    pytest.param(425, "8, ctypes.create_string_buffer(120)", 0, id="io-uring-setup"),
    pytest.param(323, "0", None, id="userfaultfd"),
    pytest.param(321, "0, ctypes.create_string_buffer(128), 128", errno.EINVAL, id="bpf"),
    pytest.param(310, "1, 0, 0, 0, 0, 0", 0, id="process-vm-readv"),
    # getpid through the x32 ABI: the same kernel code under other numbers.
    pytest.param(39 | 0x40000000, "", errno.ENOSYS, id="x32-abi"),
]


@pytest.mark.skipif(not seccomp_filter.supported(), reason="the filter is for x86_64")
@pytest.mark.parametrize(("number", "args", "without"), DENIED_CALLS)
async def test_dangerous_system_calls_are_refused(
    build_dir: Path, number: int, args: str, without: int | None
) -> None:
    call = SYSCALL.format(nr=number, args=f", {args}" if args else "")
    filtered = LocalLauncher(build_dir / "filtered", sandbox=True)
    try:
        out = await run(filtered, call)
    finally:
        await filtered.close()
    assert f"errno {errno.EPERM}" in out.stdout, out.everything
    if without is not None:
        # The same call in the same sandbox without the filter: the filter
        # is what refuses it.
        bare = LocalLauncher(build_dir / "bare", sandbox=True, seccomp=False)
        try:
            out = await run(bare, call)
        finally:
            await bare.close()
        assert f"errno {without}" in out.stdout, out.everything


async def test_builds_run_their_usual_tools_under_the_filter(launcher: LocalLauncher) -> None:
    script = (
        "set -e; git init -q r && cd r && git -c user.email=a@b -c user.name=n commit -q"
        " --allow-empty -m x && tar -czf ../a.tgz . && python3 -c 'import os, threading;"
        ' t = threading.Thread(target=print, args=("threads",)); t.start(); t.join()\''
        " && echo tools-ok"
    )
    out = await run(launcher, script)
    assert out.result.exit_code == 0, out.everything
    assert "tools-ok" in out.stdout


async def test_another_build_is_out_of_reach(launcher: LocalLauncher, host: Host) -> None:
    secret = secrets.token_hex(16)
    started = time.monotonic()
    first = await launcher.launch(
        job_spec(f"echo {secret} > secret.txt\nchmod 600 secret.txt\necho ready\nexec sleep 30\n")
    )
    seen = await until_ready(first)
    other = first.workspace.path.name
    assert (first.workspace.view / "secret.txt").read_text().strip() == secret
    attempts = (
        f"cat /workspace/../{other}/secret.txt && echo LEAKED\n"
        f"cat {host.work_root}/{other}/secret.txt && echo LEAKED\n"
        f"ls -a {host.work_root} && echo LEAKED\n"
        f"ls -a /workspace/.. | grep -qx {other} && echo LEAKED\n"
        "echo ready\nexec sleep 30\n"
    )
    second = await launcher.launch(job_spec(attempts))
    second_seen = await until_ready(second)
    try:
        if ROOT:
            # Even outside its sandbox, in the mount namespace where the
            # first workspace is mounted, the second build's uid could not
            # read it: 0700 and owned by another uid.
            assert first.user is not None
            assert second.user is not None
            assert first.user.uid != second.user.uid
            peek = await asyncio.create_subprocess_exec(
                "nsenter", f"--mount=/proc/{first.proc.pid}/ns/mnt", "--",
                "setpriv", f"--reuid={second.user.uid}", f"--regid={second.user.gid}",
                "--clear-groups", "cat", str(first.workspace.path / "secret.txt"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            peeked, complaint = await peek.communicate()
            assert peek.returncode != 0
            assert b"Permission denied" in complaint
            assert secret.encode() not in peeked
    finally:
        await second.stop(grace_seconds=0.5)
        await first.stop(grace_seconds=0.5)
    out = await finish(second, started, second_seen)
    await finish(first, started, seen)
    assert "LEAKED" not in out.stdout, out.everything
    assert secret not in out.everything
    assert out.stderr.count("No such file") >= 3, out.everything


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("{data}", id="data-dir"),
        pytest.param("{work_root}", id="work-root"),
        pytest.param("{work_root}/0123456789abcdef", id="another-workspace"),
        pytest.param("{data}/..", id="above-the-data-dir"),
        pytest.param("/", id="host-root"),
    ],
)
async def test_a_local_repository_path_cannot_expose_the_runner(
    launcher: LocalLauncher, host: Host, path: str
) -> None:
    exposed = path.format(data=host.data_dir, work_root=host.work_root)
    with pytest.raises(LaunchError, match="overlaps the runner's directory"):
        await launcher.launch(job_spec(f"cat {exposed}/conveyor.json", local_paths=(exposed,)))


async def test_a_local_repository_path_cannot_expose_the_build_cache(build_dir: Path) -> None:
    # A runner's cache may live outside its work directory
    # (CONVEYOR_CACHE_DIR): it is protected all the same.
    cache = build_dir / "elsewhere" / "cache"
    (cache / "p1").mkdir(parents=True)
    local = LocalLauncher(build_dir / "workspaces", sandbox=True, protected=(cache,))
    try:
        for exposed in (cache, cache / "p1", cache.parent):
            with pytest.raises(LaunchError, match="overlaps the runner's directory"):
                await local.launch(job_spec("ls", local_paths=(str(exposed),)))
    finally:
        await local.close()


# --------------------------------------------------------------- processes


@pytest.mark.parametrize(
    "cgroups", [pytest.param(None, id="cgroups"), pytest.param(False, id="rlimits-only")]
)
async def test_a_fork_bomb_is_contained_and_spares_a_concurrent_build(
    host: Host, cgroups: bool | None
) -> None:
    if cgroups is None and not ROOT:
        pytest.skip("per-build cgroups need a root runner")
    launcher = LocalLauncher(host.work_root, sandbox=True, cgroups=cgroups)
    limits = Limits(max_processes=64)
    baseline = len(psutil.pids())
    # Builtins only once the bomb runs (forks fail): the fifo makes `read -t`
    # a fork-free sleep.
    bomb = (
        "mkfifo /tmp/tick; exec 3<>/tmp/tick\n"
        "bomb() { bomb | bomb & }; bomb\n"
        "top=0; for ((i = 0; i < 40; i++)); do\n"
        "  n=0; for p in /proc/[0-9]*; do n=$((n + 1)); done\n"
        "  ((n > top)) && top=$n; ((top >= 60)) && break; read -t 0.05 -u 3\n"
        "done\n"
        'echo "procs=$top"; echo ready\n'
        "while :; do read -t 1 -u 3; done\n"
    )
    started = time.monotonic()
    bomber = await launcher.launch(job_spec(bomb, limits=limits))
    seen = await until_ready(bomber)
    try:
        # Another build of the same host, with the same limits, at the same time.
        victim = await run(
            launcher, "for i in $(seq 1 30); do /bin/true || exit 9; done; echo unharmed",
            limits=limits,
        )  # fmt: skip
        assert victim.result == JobResult(exit_code=0), victim.everything
        assert victim.stdout == "unharmed"
        assert len(psutil.pids()) < baseline + 150
    finally:
        await bomber.stop(grace_seconds=0.2)
    out = await finish(bomber, started, seen)
    ended = time.time()
    procs = int(out.stdout.split("procs=")[1].split()[0])
    assert 20 <= procs <= 64
    assert out.seconds < 15
    assert "fork: retry: Resource temporarily unavailable" in out.stderr
    if cgroups is None:
        assert "process limit of 64 reached" in out.text("system")
    if bomber.uid is not None:
        assert survivors(bomber, ended) == []


async def test_host_processes_are_invisible_and_unreachable(launcher: LocalLauncher) -> None:
    sleeper = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        out = await run(
            launcher,
            f"ps -e -o pid=,comm=\nkill -9 {sleeper.pid} && echo KILLED\n"
            f"ls /proc/{os.getpid()}/ && echo SEEN\nexit 0\n",
        )
        assert sleeper.returncode is None  # alive
    finally:
        sleeper.kill()
        await sleeper.wait()
    listed = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    names = [comm for _pid, comm in listed]
    assert len(listed) <= 4, listed  # bwrap's init, bash, ps
    assert "ps" in names
    assert not {"sleep", "python", "pytest", "python3"} & set(names)
    assert "KILLED" not in out.stdout
    assert "SEEN" not in out.stdout
    assert "No such process" in out.stderr


# ---------------------------------------------------------- disk and memory

DISK_FILLERS = [
    pytest.param("head -c 200M /dev/zero > big", id="one-big-file"),
    pytest.param(
        "for i in $(seq 1 40); do head -c 5M /dev/zero > f$i || exit 1; done", id="many-files"
    ),
    pytest.param("head -c 200M /dev/zero > /tmp/big", id="via-tmp"),
    pytest.param("head -c 200M /dev/zero > /var/tmp/big", id="via-var-tmp"),
]


@pytest.mark.parametrize("filler", DISK_FILLERS)
async def test_filling_the_disk_is_stopped_at_the_workspace_limit(
    launcher: LocalLauncher, filler: str
) -> None:
    if not launcher.hard_workspace_limit:
        pytest.skip("hard workspace limits need a root runner with loop devices")
    out = await run(
        launcher,
        f"( {filler} ) && echo WROTE-ALL\necho used=$(du -sm /workspace | cut -f1)\nexit 1\n",
        limits=Limits(workspace_mb=50),
    )
    assert "WROTE-ALL" not in out.stdout, out.everything
    assert int(out.stdout.split("used=")[1]) <= 50
    assert "No space left on device" in out.stderr
    assert out.result.error == "workspace size limit of 50 MiB exceeded"
    assert "workspace size limit of 50 MiB exceeded" in out.text("system")
    assert out.seconds < 10


@pytest.mark.parametrize(
    ("mount", "cap_mb"),
    [pytest.param("/dev/shm", 64, id="dev-shm"), pytest.param("/run", 16, id="run")],
)
async def test_memory_backed_mounts_are_bounded(
    launcher: LocalLauncher, mount: str, cap_mb: int
) -> None:
    out = await run(
        launcher,
        f"head -c 200M /dev/zero > {mount}/big && echo WROTE-ALL\n"
        f"echo size=$(du -sm {mount} | cut -f1)\nexit 0\n",
        limits=Limits(memory_mb=256),
    )
    assert "WROTE-ALL" not in out.stdout, out.everything
    assert "No space left on device" in out.stderr
    assert int(out.stdout.split("size=")[1]) <= cap_mb


MEMORY_HOGS = [
    pytest.param(
        None, "python3 -c \"b = b'x' * (256 << 20)\" || exit 1", "memory limit", id="one-process"
    ),
    pytest.param(
        None,
        "for i in 1 2 3 4; do python3 -c \"import time; b = b'x' * (40 << 20); time.sleep(3)\" &"
        " pids+=($!); done\nfor p in ${pids[@]}; do wait $p || exit 1; done",
        "memory limit",
        id="many-processes",
    ),
    pytest.param(
        False,
        "python3 -c \"b = b'x' * (256 << 20)\" || exit 1",
        "MemoryError",
        id="one-process-rlimits-only",
    ),
]


@pytest.mark.parametrize(("cgroups", "hog", "evidence"), MEMORY_HOGS)
async def test_exceeding_memory_is_stopped(
    host: Host, cgroups: bool | None, hog: str, evidence: str
) -> None:
    metrics = RunnerMetrics(CollectorRegistry())
    launcher = LocalLauncher(host.work_root, sandbox=True, cgroups=cgroups, metrics=metrics)
    if cgroups is None and launcher.cgroup_root is None:
        pytest.skip("per-build memory limits need cgroup v1 and a root runner")
    out = await run(launcher, f"{hog}\necho SURVIVED\n", limits=Limits(memory_mb=64))
    assert "SURVIVED" not in out.stdout, out.everything
    assert out.result.exit_code != 0
    assert out.seconds < 15
    if cgroups is None:
        assert out.result.error == "memory limit of 64 MiB exceeded"
        assert "the kernel killed" in out.text("system")
        assert metrics.sandbox_limit_hits.labels("memory")._value.get() == 1
    else:
        assert evidence in out.stderr, out.everything


CPU_HOGS = [
    pytest.param(None, "while :; do :; done", id="one-process"),
    pytest.param(
        None,
        # Four processes each under the limit, together well over it.
        'for i in 1 2 3 4; do python3 -c "import time\nwhile time.process_time() < 0.8: pass" &'
        " done; wait",
        id="many-processes",
    ),
    pytest.param(False, "while :; do :; done", id="one-process-rlimits-only"),
]


@pytest.mark.parametrize(("cgroups", "hog"), CPU_HOGS)
async def test_the_cpu_time_limit_stops_the_build(
    host: Host, cgroups: bool | None, hog: str
) -> None:
    launcher = LocalLauncher(host.work_root, sandbox=True, cgroups=cgroups)
    if cgroups is None and launcher.cgroup_root is None:
        pytest.skip("a build-wide CPU limit needs cgroup v1 and a root runner")
    out = await run(launcher, f"{hog}\necho SURVIVED\n", limits=Limits(cpu_seconds=1))
    assert "SURVIVED" not in out.stdout, out.everything
    assert out.seconds < 10
    if cgroups is None:
        assert out.result == JobResult(
            exit_code=None, error="CPU time limit of 1 s exceeded", killed=True
        )
    else:
        assert out.result.exit_code in (137, 152)  # SIGKILL / SIGXCPU


# ------------------------------------------------------------------ network


@pytest_asyncio.fixture
async def host_service() -> AsyncIterator[int]:
    """A TCP service on the host's 127.0.0.1 that greets whoever connects."""

    async def greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from the host\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_an_isolated_build_cannot_reach_the_host_network(
    launcher: LocalLauncher, host_service: int
) -> None:
    out = await run(
        launcher,
        f"exec 3<>/dev/tcp/127.0.0.1/{host_service} && head -1 <&3\n"
        "exec 4<>/dev/tcp/192.0.2.1/80 && echo CONNECTED\n"
        "cut -d: -f1 /proc/net/dev | tail -n +3\nexit 0\n",
        network=False,
    )
    assert "hello from the host" not in out.stdout
    assert "CONNECTED" not in out.stdout
    assert "Connection refused" in out.stderr
    assert "Network is unreachable" in out.stderr
    assert [x.strip() for x in out.stdout.splitlines()] == ["lo"]


@pytest_asyncio.fixture
async def outside_service() -> AsyncIterator[tuple[str, int]]:
    """The same greeting on the host's own address, as a service elsewhere
    on the network would be reached."""
    address = host_address()
    if address is None:
        pytest.skip("this host has no address besides loopback")

    async def greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from outside\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, address, 0)
    try:
        yield address, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


needs_slirp = pytest.mark.skipif(
    own_network_tool() is None,
    reason="needs slirp4netns (scripts/bootstrap installs it) and /dev/net/tun",
)


@needs_slirp
async def test_a_build_with_network_reaches_out_but_not_the_host(
    launcher: LocalLauncher, build_dir: Path, host_service: int, outside_service: tuple[str, int]
) -> None:
    address, port = outside_service
    probe = (
        f"(exec 3<>/dev/tcp/{address}/{port} && head -1 <&3)\n"
        f"(exec 3<>/dev/tcp/127.0.0.1/{host_service} && head -1 <&3)\n"
        "(exec 3<>/dev/tcp/169.254.169.254/80 && echo METADATA-REACHED)\n"
        "cat /etc/resolv.conf\n"
    )
    outside = outside_target()
    if outside is not None:
        probe += f"(exec 3<>/dev/tcp/{outside[0]}/{outside[1]} && echo outside-reached)\n"
    probe += "exit 0\n"
    out = await run(launcher, probe, network=True)
    assert out.result.exit_code == 0, out.everything
    assert "hello from the host" not in out.stdout, "host loopback reachable"
    assert "nameserver 10.0.2.3" in out.stdout
    if fence_tools() != (None, None):
        assert "hello from outside" not in out.stdout, "the host's own address reachable"
        assert "METADATA-REACHED" not in out.stdout
    if outside is not None:
        assert "outside-reached" in out.stdout, out.everything
    # What it stands for: sharing the host's network, a build reaches every
    # service of the host, on its loopback and on its own address.
    shared = LocalLauncher(build_dir / "shared", sandbox=True, user_network=False)
    try:
        out = await run(shared, probe, network=True)
    finally:
        await shared.close()
    assert "hello from the host" in out.stdout
    assert "hello from outside" in out.stdout


@needs_slirp
async def test_the_network_helper_ends_with_the_build(launcher: LocalLauncher) -> None:
    before = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "slirp4netns"}
    out = await run(launcher, "true", network=True)
    assert out.result.exit_code == 0, out.everything
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = {
            p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "slirp4netns"
        } - before
        if not left:
            break
        await asyncio.sleep(0.05)
    assert not left, f"slirp4netns processes left behind: {left}"


@pytest.fixture(params=[0o600, 0o666], ids=["tun-0600", "tun-0666"])
def tun_mode(request: pytest.FixtureRequest) -> Iterator[int]:
    """/dev/net/tun set to each mode a build host may have: 0600 (a bare
    kernel's) and 0666 (udev's, wherever udev is installed); then put back."""
    if not ROOT:
        pytest.skip("changing /dev/net/tun's mode needs root")
    before = stat.S_IMODE(os.stat(TUN).st_mode)
    os.chmod(TUN, request.param)
    try:
        yield request.param
    finally:
        os.chmod(TUN, before)


@needs_slirp
async def test_a_build_gets_its_network_whatever_the_tun_device_mode(
    build_dir: Path, tun_mode: int, host_service: int
) -> None:
    local = LocalLauncher(build_dir / "workspaces", sandbox=True, user_network=True)
    try:
        job = await local.launch(
            job_spec(
                "cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' '\n"
                "grep -c '^tap0' /proc/net/route\n"
                f"(exec 3<>/dev/tcp/127.0.0.1/{host_service} && head -1 <&3)\n"
                "echo ready\nread -r -t 20 _ || true\n",
                network=True,
            )
        )
        started = time.monotonic()
        seen = await asyncio.wait_for(until_ready(job), 30)
        # slirp4netns parses the build's packets: never root, whatever the
        # device's mode, and sandboxed in its own mount namespace.
        assert job.network is not None
        assert job.network.proc is not None
        slirp = psutil.Process(job.network.proc.pid)
        assert slirp.name() == "slirp4netns"
        assert job.user is not None
        assert set(slirp.uids()) == {job.user.uid}
        assert set(slirp.gids()) == {job.user.gid}
        assert os.readlink(f"/proc/{slirp.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        await job.stop(grace_seconds=1)
        out = await asyncio.wait_for(finish(job, started, seen), 30)
    finally:
        await local.close()
    stdout = out.stdout.splitlines()
    assert sorted(stdout[:2]) == ["lo", "tap0"], out.everything
    assert stdout[2] == "2", out.everything  # its subnet and the default route
    assert "hello from the host" not in out.stdout
    assert stat.S_IMODE(os.stat(TUN).st_mode) == tun_mode  # the launcher left it alone


@pytest.fixture
def path_without_slirp4netns(build_dir: Path) -> str:
    """A PATH with every tool of this host but slirp4netns (and bash, which
    the sandbox runs: the launcher then takes /bin/bash, a path that exists
    inside the sandbox as well)."""
    bin_dir = build_dir / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"):
        for tool in Path(directory).iterdir():
            if tool.name not in ("slirp4netns", "bash") and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    return str(bin_dir)


@needs_slirp
async def test_without_slirp4netns_builds_share_the_host_network_with_a_warning(
    build_dir: Path,
    host_service: int,
    path_without_slirp4netns: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PATH", path_without_slirp4netns)
    assert own_network_tool() is None
    with pytest.raises(LaunchError, match="slirp4netns"):
        LocalLauncher(build_dir / "strict", sandbox=True, user_network=True)
    caplog.set_level("WARNING", logger="runner.launchers.local")
    local = LocalLauncher(build_dir / "workspaces", sandbox=True)
    monkeypatch.undo()
    assert SHARED_NETWORK_WARNING in caplog.text
    try:
        out = await run(
            local, f"(exec 3<>/dev/tcp/127.0.0.1/{host_service} && head -1 <&3)", network=True
        )
    finally:
        await local.close()
    assert out.result.exit_code == 0, out.everything
    assert "hello from the host" in out.stdout


# ------------------------------------------------------- the job environment


async def test_the_job_environment_never_reaches_the_host_side(
    launcher: LocalLauncher, build_dir: Path
) -> None:
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    env: dict[str, str] = {}
    marker = build_dir / "preloaded"
    cc = shutil.which("cc")
    if cc:
        # A library that leaves a mark on the host wherever it is loaded;
        # inside the sandbox its path does not exist, so it never loads there.
        source = build_dir / "mark.c"
        source.write_text(
            "#include <fcntl.h>\n#include <unistd.h>\n"
            "__attribute__((constructor)) static void mark(void) {\n"
            f'  int fd = open("{marker}", O_WRONLY | O_CREAT, 0666); if (fd >= 0) close(fd);\n'
            "}\n"
        )
        library = build_dir / "mark.so"
        compiler = await asyncio.create_subprocess_exec(
            cc, "-shared", "-fPIC", "-o", str(library), str(source)
        )
        assert await compiler.wait() == 0
        library.chmod(0o755)
        marker.parent.chmod(0o777)
        env["LD_PRELOAD"] = str(library)
    started = time.monotonic()
    job = await launcher.launch(
        job_spec('echo "$CONVEYOR_SECRET"; echo ready; exec sleep 30', env=env,
                 secret_env={"CONVEYOR_SECRET": secret})
    )  # fmt: skip
    seen = await until_ready(job)
    try:
        outer = psutil.Process(job.proc.pid)
        family = [outer, *outer.children(recursive=True)]
        host_side = [p for p in family if p.name() == "bwrap"]
        assert host_side
        for proc in host_side:
            environ = proc.environ()
            assert "CONVEYOR_SECRET" not in environ
            assert "LD_PRELOAD" not in environ
        for proc in family:
            assert not any(secret in arg for arg in proc.cmdline())
    finally:
        await job.stop(grace_seconds=0.2)
    out = await finish(job, started, seen)
    assert out.stdout.splitlines()[0] == secret  # the build itself got it
    assert not marker.exists(), "LD_PRELOAD of the job ran on the host"


# ----------------------------------------------- without bubblewrap, uid alone


@needs_root
@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param("cat /etc/shadow", id="etc-shadow"),
        pytest.param("cat {data}/conveyor.json", id="data-dir-token"),
        pytest.param("ls {data}/postgres", id="data-dir-postgres"),
        pytest.param("ls {work_root}", id="list-workspaces"),
        pytest.param("cat {other}/secret.txt", id="another-workspace"),
    ],
)
async def test_without_bubblewrap_the_build_uid_alone_still_keeps_secrets(
    host: Host, attempt: str
) -> None:
    # The workspaces on the host's disk, where a plain process could find them.
    launcher = LocalLauncher(host.work_root, sandbox=False, hard_workspace_limit=False)
    secret = secrets.token_hex(16)
    started = time.monotonic()
    first = await launcher.launch(
        job_spec(f"echo {secret} > secret.txt; chmod 600 secret.txt; echo ready; exec sleep 30")
    )
    seen = await until_ready(first)
    try:
        script = attempt.format(
            data=host.data_dir, work_root=host.work_root, other=first.workspace.path
        )
        out = await run(launcher, f"{script} && echo LEAKED\nexit 0\n")
    finally:
        await first.stop(grace_seconds=0.2)
    await finish(first, started, seen)
    assert "LEAKED" not in out.stdout, out.everything
    assert "Permission denied" in out.stderr
    assert host.token not in out.everything
    assert secret not in out.everything


@pytest.mark.parametrize("link", ["/run/conveyor-test/stub-resolv.conf", "../run/x/resolv.conf"])
def test_the_builds_resolver_lands_where_a_symlinked_resolv_conf_points(
    build_dir: Path, link: str
) -> None:
    # systemd-resolved hosts: /etc/resolv.conf -> ../run/systemd/resolve/...
    # and the sandbox's /run is empty. Real bubblewrap, an /etc of our own.
    etc = build_dir / "etc"
    etc.mkdir()
    (etc / "resolv.conf").symlink_to(link)
    fd = data_fd(RESOLV_CONF.encode())
    try:
        args = resolv_conf_args(etc / "resolv.conf", fd)
        done = subprocess.run(
            ["bwrap", "--unshare-all", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
             "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
             "--ro-bind", str(etc), "/etc", "--tmpfs", "/run", *args,
             "cat", "/etc/resolv.conf"],
            pass_fds=(fd,), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    assert done.stdout == RESOLV_CONF
