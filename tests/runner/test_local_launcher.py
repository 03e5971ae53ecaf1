"""The local launcher's own behaviour beyond the launcher contract: no
sandbox only by the operator's choice, and then a warning (down to
`conveyor builds show`), one uid per
running build, the job's environment, and that a job leaves nothing behind
on the host (cgroups, mounts, loop devices, images, slots)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from conveyor.v1 import types_pb2 as pb
from runner.build_run import NO_SANDBOX_BUILD_WARNING
from runner.config import RunnerSettings
from runner.launchers.base import JobResult, JobSpec, LaunchError, Limits, OutputLine
from runner.launchers.local import NO_SANDBOX_WARNING, LocalLauncher
from runner.launchers.local_job import LocalJob
from runner.metrics import RunnerMetrics
from runner.script import BuildScript
from tests.helpers import Api, ControlHandle, RunnerProcess, git, make_repo

pytestmark = pytest.mark.timeout(60)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs a root runner")
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")


def job_spec(script: str, **fields: object) -> JobSpec:
    return JobSpec(build_id=uuid.uuid4().hex[:16], script=script, env={}, **fields)  # type: ignore[arg-type]


async def run(launcher: LocalLauncher, spec: JobSpec) -> tuple[list[OutputLine], JobResult]:
    job = await launcher.launch(spec)
    lines = [line async for line in job.output()]
    return lines, await job.wait()


def of(lines: list[OutputLine], stream: str) -> list[str]:
    return [line.data.decode(errors="replace") for line in lines if line.stream == stream]


async def until_ready(job: LocalJob) -> None:
    async for line in job.output():
        if line.stream == "stdout" and line.data == b"ready":
            return
    raise AssertionError("the job ended before it was ready")


# ------------------------------------------------------------- no sandbox


async def test_with_no_sandbox_chosen_every_log_starts_with_a_warning(build_dir: Path) -> None:
    metrics = RunnerMetrics(CollectorRegistry())
    launcher = LocalLauncher(build_dir / "workspaces", sandbox=False, metrics=metrics)
    assert not launcher.sandboxed
    assert metrics.registry.get_sample_value("conveyor_runner_sandbox", {"mode": "none"}) == 1
    assert metrics.registry.get_sample_value("conveyor_runner_sandbox", {"mode": "bubblewrap"}) == 0
    lines, result = await run(launcher, job_spec("echo built"))
    assert lines[0] == OutputLine("system", NO_SANDBOX_WARNING.encode())
    assert of(lines, "stdout") == ["built"]
    assert result == JobResult(exit_code=0)


@needs_bwrap
def test_a_sandboxed_launcher_says_so_on_its_metrics(build_dir: Path) -> None:
    metrics = RunnerMetrics(CollectorRegistry())
    launcher = LocalLauncher(build_dir / "workspaces", metrics=metrics)
    assert launcher.sandboxed
    assert metrics.registry.get_sample_value("conveyor_runner_sandbox", {"mode": "bubblewrap"}) == 1
    assert metrics.registry.get_sample_value("conveyor_runner_sandbox", {"mode": "none"}) == 0


def _path_without_bwrap(bin_dir: Path, *, broken: bool = False) -> str:
    """A PATH with every program of this host but bubblewrap; with
    ``broken``, a bwrap that fails whatever it is asked (as one does where
    unprivileged user namespaces are off)."""
    bin_dir.mkdir()
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = bin_dir / entry.name
            if entry.name != "bwrap" and not link.exists():
                link.symlink_to(entry.path)
    if broken:
        (bin_dir / "bwrap").symlink_to(shutil.which("false") or "/bin/false")
    return str(bin_dir)


@pytest.mark.parametrize("broken", [False, True], ids=["missing", "not-working"])
def test_without_a_working_bubblewrap_the_launcher_refuses(
    build_dir: Path, monkeypatch: pytest.MonkeyPatch, broken: bool
) -> None:
    monkeypatch.setenv("PATH", _path_without_bwrap(build_dir / "bin", broken=broken))
    why = "does not work here" if broken else "is not installed"
    with pytest.raises(LaunchError, match=why) as refused:
        LocalLauncher(build_dir / "workspaces")
    assert "--sandbox none" in str(refused.value)


def test_the_sandbox_setting_takes_bubblewrap_or_none() -> None:
    base = {"CONVEYOR_CONTROL_ADDR": "localhost:1", "CONVEYOR_RUNNER_TOKEN": "t"}
    assert RunnerSettings.from_env(base).sandbox == "bubblewrap"
    assert RunnerSettings.from_env({**base, "CONVEYOR_SANDBOX": "none"}).sandbox == "none"
    assert RunnerSettings.from_env(base, sandbox="none").sandbox == "none"
    with pytest.raises(ValueError, match="CONVEYOR_SANDBOX: must be bubblewrap or none"):
        RunnerSettings.from_env({**base, "CONVEYOR_SANDBOX": "off"})


async def test_a_runner_without_bubblewrap_refuses_to_start(
    control: ControlHandle, build_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", await asyncio.to_thread(_path_without_bwrap, build_dir / "bin"))
    runner = RunnerProcess(control.plane.grpc_address, control.runner_token, build_dir / "runner")
    await runner.start()
    try:
        assert runner.proc is not None
        code = await asyncio.wait_for(runner.proc.wait(), 30)
    finally:
        await runner.stop()
    assert code == 2, runner.log()
    assert "error: bubblewrap (bwrap) is not installed" in runner.log()
    assert "Traceback" not in runner.log()
    assert "conveyor runner start --sandbox none" in runner.log()


async def test_builds_show_warns_when_the_operator_chose_no_sandbox(
    control: ControlHandle,
    api: Api,
    build_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = await asyncio.to_thread(make_repo, build_dir / "repo")
    monkeypatch.setenv("PATH", await asyncio.to_thread(_path_without_bwrap, build_dir / "bin"))
    runner = RunnerProcess(control.plane.grpc_address, control.runner_token, build_dir / "runner")
    await runner.start("--sandbox", "none")
    try:
        await control.wait_runners(1)
        await api.create_project("unsandboxed", repo)
        build = await api.trigger("unsandboxed")
        done = await api.wait_status(build.id)
    finally:
        await runner.stop()
    texts = [line.text for line in await api.logs(build.id)]
    assert done.status == pb.BUILD_STATUS_SUCCEEDED, (done.status_reason, texts)
    assert list(done.warnings) == [NO_SANDBOX_BUILD_WARNING]
    assert NO_SANDBOX_WARNING in texts
    assert "sandbox NONE (the operator's choice: --sandbox none)" in runner.log()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor_cli.main", "builds", "show", build.id,
        env={**os.environ, "CONVEYOR_ADDR": control.plane.grpc_address,
             "CONVEYOR_TOKEN": control.admin_token},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert f"WARNING    {NO_SANDBOX_BUILD_WARNING}" in out.decode()


# ------------------------------------------------------------------ build uids


@needs_root
async def test_running_builds_never_share_a_uid_and_slots_are_reused(
    launcher: LocalLauncher,
) -> None:
    hold = "id -u; echo ready; exec sleep 30"
    jobs = [await launcher.launch(job_spec(hold)) for _ in range(3)]
    for job in jobs:
        await until_ready(job)
    uids = [job.uid for job in jobs]
    assert None not in uids
    assert len(set(uids)) == 3
    for job in jobs:
        await job.stop(grace_seconds=0.2)
        async for _line in job.output():
            pass
        await job.wait()
    # Freed slots are handed out again (lowest first), not leaked.
    lines, _result = await run(launcher, job_spec("id -u"))
    assert int(of(lines, "stdout")[0]) in uids


# ------------------------------------------------------------- environment


@needs_bwrap
async def test_the_environment_arrives_intact_and_bad_names_are_reported(
    launcher: LocalLauncher,
) -> None:
    # More than a pipe holds at once, less than one variable may hold
    # (MAX_ARG_STRLEN, 128 KiB).
    big = "x" * 100_000
    spec = JobSpec(
        build_id=uuid.uuid4().hex[:16],
        script='printf "%s|%s|%s\\n" "${#BIG}" "$MULTI" "$HOME"; echo "PATH=$PATH"',
        env={"BIG": big, "MULTI": "a b\nc=d", "1NVALID": "x"},
        secret_env={"TOKEN": "t"},
    )
    lines, result = await run(launcher, spec)
    assert result == JobResult(exit_code=0)
    assert of(lines, "stdout") == [
        "100000|a b",
        "c=d|/workspace/.conveyor",
        "PATH=/usr/local/bin:/usr/bin:/bin",
    ]
    assert of(lines, "stderr") == [
        "conveyor: ignored the environment variable 1NVALID (not a valid name)"
    ]


# ---------------------------------------------------------- nothing left behind


def _loop_backing_files() -> list[str]:
    files = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            files.append(backing.read_text().strip())
        except OSError:
            continue
    return files


def _mounts_under(root: Path) -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(root))
    ]


@needs_root
@needs_bwrap
async def test_a_job_leaves_nothing_behind_on_the_host(launcher: LocalLauncher) -> None:
    root = launcher.work_root
    job = await launcher.launch(
        job_spec("head -c 1M /dev/zero > data; echo ready; exec sleep 30", limits=Limits())
    )
    await until_ready(job)
    # The workspace filesystem is the job's alone: not mounted on the host.
    assert job.workspace.mounted == launcher.hard_workspace_limit
    assert _mounts_under(root) == []
    assert (job.workspace.view / "data").stat().st_size == 1 << 20
    cgroup_dirs = job.cgroup.unique_dirs if job.cgroup else []
    inodes = [path.stat().st_ino for path in cgroup_dirs]
    await job.stop(grace_seconds=0.2)
    async for _line in job.output():
        pass
    await job.wait()
    for path, inode in zip(cgroup_dirs, inodes, strict=True):
        # Gone, or made anew for the next build of the slot (which may be
        # another test session's on this host).
        assert not path.exists() or path.stat().st_ino != inode
    assert list(root.iterdir()) == []  # no workspace, no image
    deadline = time.monotonic() + 5
    while any(str(root) in backing for backing in _loop_backing_files()):
        assert time.monotonic() < deadline, "the loop device outlived the job"
        await asyncio.sleep(0.02)


@needs_root
async def test_a_launch_cancelled_half_way_leaves_nothing_behind(
    launcher: LocalLauncher,
) -> None:
    for delay in (0.0, 0.005, 0.02, 0.05):
        task = asyncio.ensure_future(launcher.launch(job_spec("sleep 30")))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            job = await task
        except asyncio.CancelledError:
            pass
        else:  # it was done before the cancel: stop it as a caller would
            await job.stop(grace_seconds=0)
            async for _line in job.output():
                pass
            await job.wait()
    deadline = time.monotonic() + 10
    root = launcher.work_root
    assert launcher.users is not None
    while launcher.users.held or (root.exists() and list(root.iterdir())):
        assert time.monotonic() < deadline, (launcher.users.held, list(root.iterdir()))
        await asyncio.sleep(0.02)


async def test_a_stale_image_of_a_dead_runner_is_swept(tmp_path: Path) -> None:
    root = tmp_path / "workspaces"
    root.mkdir()
    stale, fresh = root / ".0123456789abcdef.img", root / ".fedcba9876543210.img"
    for image in (stale, fresh):
        image.write_bytes(b"\0" * 4096)
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    LocalLauncher(root)
    assert not stale.exists()
    assert fresh.exists()  # another launcher's build may be about to mount it


@needs_root
async def test_a_background_process_of_an_unsandboxed_build_dies_with_it(
    build_dir: Path,
) -> None:
    launcher = LocalLauncher(build_dir / "workspaces", sandbox=False)
    lines, result = await run(
        launcher, job_spec("setsid sleep 300 > /dev/null 2>&1 < /dev/null & echo $!")
    )
    assert result.exit_code == 0
    pid = int(of(lines, "stdout")[0])
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} outlived its build"
        await asyncio.sleep(0.02)


async def test_an_unsandboxed_build_ends_with_its_script_despite_a_background_process(
    build_dir: Path,
) -> None:
    launcher = LocalLauncher(build_dir / "workspaces", sandbox=False)
    started = time.monotonic()
    # The background process holds the build's stdout open.
    lines, result = await asyncio.wait_for(run(launcher, job_spec("sleep 300 & echo started")), 20)
    assert result == JobResult(exit_code=0)
    assert of(lines, "stdout") == ["started"]
    assert time.monotonic() - started < 10


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ------------------------------------------------------------ cgroup discovery


@needs_root
def test_build_cgroups_are_found_on_each_v1_hierarchy(tmp_path: Path) -> None:
    from runner.launchers.cgroups import CgroupRoot

    hierarchies = {name: tmp_path / name for name in ("memory", "pids", "cpu,cpuacct")}
    for path in hierarchies.values():
        path.mkdir()
    mountinfo = tmp_path / "mountinfo"
    lines = [
        "23 1 0:21 / /sys rw - sysfs sysfs rw",
        f"35 23 0:32 / {hierarchies['memory']} rw,relatime shared:9 - cgroup cgroup rw,memory",
        f"39 23 0:36 / {hierarchies['pids']} rw,relatime - cgroup cgroup rw,pids",
        f"33 23 0:30 / {hierarchies['cpu,cpuacct']} rw - cgroup cgroup rw,cpu,cpuacct",
        "41 23 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw",
    ]
    mountinfo.write_text("\n".join(lines) + "\n")
    root = CgroupRoot.detect(mountinfo)
    assert root is not None
    assert root.parents == {
        "memory": hierarchies["memory"] / "conveyor-builds",
        "pids": hierarchies["pids"] / "conveyor-builds",
        "cpuacct": hierarchies["cpu,cpuacct"] / "conveyor-builds",
    }
    assert all(path.is_dir() for path in root.parents.values())
    root.close()
    assert not any(path.exists() for path in root.parents.values())
    # Without the pids controller on v1 (cgroup v2 only, say): no cgroups.
    mountinfo.write_text("\n".join(line for line in lines if "pids" not in line) + "\n")
    assert CgroupRoot.detect(mountinfo) is None


# ------------------------------------------------------ unreadable repository


@needs_bwrap
async def test_a_repository_the_build_user_cannot_read_says_so(
    launcher: LocalLauncher, build_dir: Path
) -> None:
    # What a home directory is: 0700, owned by someone else than the build
    # user (as root: root; unprivileged, the runner's own uid gets 0000).
    home = build_dir / "home"
    repo = make_repo(home / "myapp")
    home.chmod(0o700 if ROOT else 0o000)
    try:
        with pytest.raises(LaunchError) as caught:
            await launcher.launch(job_spec("echo never\n", local_paths=(str(repo),)))
    finally:
        home.chmod(0o755)
    message = str(caught.value)
    assert f"the build user cannot read {repo}: make it readable to uid " in message
    assert "or serve it over git/ssh/https" in message
    assert not any((build_dir / "workspaces").glob("*/.conveyor")), "workspace left behind"
    # Readable again: the same launch works.
    lines, result = await run(launcher, job_spec("echo ran\n", local_paths=(str(repo),)))
    assert result.exit_code == 0, lines
    assert of(lines, "stdout") == ["ran"]


# ------------------------------------------------------------ control lines


@needs_bwrap
async def test_control_lines_arrive_after_the_output_written_before_them(
    launcher: LocalLauncher, build_dir: Path
) -> None:
    repo = make_repo(build_dir / "ordered")
    steps = (
        ("one", "seq 1 3000; printf 'no newline'"),  # more than a pipe holds
        ("two", "echo two >&2; echo two"),
    )
    script = BuildScript(str(repo), git(repo, "rev-parse", "HEAD"), "main", steps, channel=True)
    lines, result = await run(launcher, job_spec(script.render(), local_paths=(str(repo),)))
    assert result.exit_code == 0, lines
    stdout = [(ln.stream, ln.data.decode()) for ln in lines if ln.stream != "stderr"]
    begin_one = stdout.index(("control", "begin:1"))
    assert stdout[begin_one + 1 : begin_one + 3] == [("stdout", "1"), ("stdout", "2")]
    assert stdout[begin_one + 3000 : begin_one + 3005] == [
        ("stdout", "3000"),
        ("stdout", "no newline"),
        ("control", "end:1:0"),
        ("control", "begin:2"),
        ("stdout", "two"),
    ]
    assert stdout[-1] == ("control", "end:2:0")
