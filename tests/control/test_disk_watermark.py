"""A full disk is a bad hour, not a dead system: below the free-space
watermark of the database's disk, log batches are refused (RESOURCE_EXHAUSTED)
before they reach PostgreSQL, /readyz and the metrics say so, the runner keeps
its batches and sends them again, and nothing is lost once space returns.
An account over its log quota gets its build's log closed with a reason.

The disk is a tmpfs the test mounts (root only) and unmounts."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from common.settings import ConfigError
from control.config import DiskSettings, Settings
from control.logs.admission import DatabaseBudgetProbe, LogAdmission, quota_marker
from control.main import ControlPlane
from control.metrics import ControlMetrics
from control.storage.db import Database
from control.storage.logs import LogStore
from conveyor.v1 import types_pb2 as pb
from tests.helpers import (
    Api,
    ControlHandle,
    ProtocolRunner,
    RunnerProcess,
    make_repo,
    mounted_tmpfs,
)
from tests.observability.scrape import get_json, scrape

MiB = 1024 * 1024
WATERMARK = 8 * MiB


class SmallDisk:
    """A tmpfs of ``size`` bytes; ``fill(leave)`` puts a ballast file on it
    so that ``leave`` bytes stay free, ``free_up()`` deletes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ballast = path / "ballast"

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        need = self.free() - leave
        with self.ballast.open("ab") as f:
            os.posix_fallocate(f.fileno(), f.tell(), need)

    def free_up(self) -> None:
        self.ballast.unlink(missing_ok=True)


@pytest.fixture
def small_disk() -> Iterator[SmallDisk]:
    with mounted_tmpfs("32m", "conveyor-disk-") as path:
        yield SmallDisk(path)


def _disk_control(database_url: str, disk: DiskSettings) -> ControlHandle:
    handle = ControlHandle(database_url)
    handle.settings = handle.settings.with_(disk=disk)
    handle.plane = ControlPlane(handle.settings)
    return handle


@pytest_asyncio.fixture
async def disk_control(database_url: str, small_disk: SmallDisk) -> AsyncIterator[ControlHandle]:
    handle = _disk_control(
        database_url,
        DiskSettings(path=str(small_disk.path), min_free_bytes=WATERMARK, interval=0.1),
    )
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


async def _readyz_until(url: str, status: str, timeout: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await get_json(url + "/readyz")
        if code == 200 and body.get("status") == status:
            return body
        assert time.monotonic() < deadline, f"/readyz is {code} {body}, not {status}"
        await asyncio.sleep(0.05)


async def _assigned(
    control: ControlHandle, api: Api, proto: ProtocolRunner, repo: Path, name: str
) -> tuple[pb.Build, object]:
    project = await api.create_project(name, repo)
    build = await api.trigger(project.id)
    assignment = await proto.next_assignment()
    await proto.report(assignment, pb.BUILD_STATUS_RUNNING)
    return build, assignment


async def test_below_the_watermark_batches_are_refused_and_resent_with_nothing_lost(
    disk_control: ControlHandle, small_disk: SmallDisk, tmp_path: Path
) -> None:
    control = disk_control
    url = control.http_url
    api = Api(control.plane.grpc_address, control.admin_token)
    proto = ProtocolRunner(control.plane.grpc_address, control.runner_token)
    await proto.start()
    try:
        build, assignment = await _assigned(control, api, proto, make_repo(tmp_path / "r"), "disk")
        body = await _readyz_until(url, "ready")
        assert body["disk"]["accepting_logs"] is True  # type: ignore[index]
        await proto.append(assignment, 1, ["before"])

        small_disk.fill(leave=WATERMARK // 2)
        body = await _readyz_until(url, "degraded")
        assert "the database's disk is low" in str(body["reason"])
        assert body["disk"]["accepting_logs"] is False  # type: ignore[index]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await proto.append(assignment, 2, ["during"])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "watermark is 8 MiB" in str(refused.value.details())
        metrics = await scrape(url + "/metrics")
        assert metrics.value("conveyor_database_disk_low") == 1
        assert metrics.value("conveyor_database_disk_min_free_bytes") == WATERMARK
        assert metrics.value("conveyor_database_disk_free_bytes") < WATERMARK
        assert metrics.value("conveyor_log_batches_refused_total", reason="disk_low") == 1
        # The build goes on: only its log waits.
        assert (await api.get(build.id)).status == pb.BUILD_STATUS_RUNNING

        small_disk.free_up()
        await _readyz_until(url, "ready")
        reply = await proto.append(assignment, 2, ["during"])
        assert (reply.last_line, reply.duplicate) == (2, False)
        lines = await api.logs(build.id)
        assert [(ln.number, ln.text) for ln in lines] == [(1, "before"), (2, "during")]
        metrics = await scrape(url + "/metrics")
        assert metrics.value("conveyor_database_disk_low") == 0
    finally:
        await proto.close()
        await api.close()


@pytest.mark.timeout(90)
async def test_a_real_runner_buffers_through_a_full_disk_and_the_build_succeeds_whole(
    disk_control: ControlHandle, small_disk: SmallDisk, tmp_path: Path
) -> None:
    control = disk_control
    api = Api(control.plane.grpc_address, control.admin_token)
    runner = RunnerProcess(control.plane.grpc_address, control.runner_token, tmp_path / "runner")
    await runner.start()
    try:
        await control.wait_runners(1)
        repo = make_repo(
            tmp_path / "repo", 'for i in $(seq 1 300); do echo "n $i"; sleep 0.005; done\n'
        )
        project = await api.create_project("full", repo)
        small_disk.fill(leave=WATERMARK // 2)
        await _readyz_until(control.http_url, "degraded")
        build = await api.trigger(project.id)
        # The runner is refused again and again while the disk stays low...
        deadline = time.monotonic() + 30
        while True:
            metrics = await scrape(control.http_url + "/metrics")
            if metrics.value("conveyor_log_batches_refused_total", reason="disk_low") >= 3:
                break
            assert time.monotonic() < deadline, "the runner never sent a batch"
            await asyncio.sleep(0.1)
        assert (await api.get(build.id)).status in (
            pb.BUILD_STATUS_INITIALIZING,
            pb.BUILD_STATUS_RUNNING,
        )
        # ...and once space returns, every line arrives exactly once.
        small_disk.free_up()
        done = await api.wait_status(build.id, timeout=60)
        assert done.status == pb.BUILD_STATUS_SUCCEEDED, done.status_reason
        lines = await api.logs(build.id)
        assert [ln.number for ln in lines] == list(range(1, len(lines) + 1))
        printed = [ln.text for ln in lines if ln.text.startswith("n ")]
        assert printed == [f"n {i}" for i in range(1, 301)]
        assert "refused, will resend" in runner.log()
    finally:
        await runner.stop()
        await api.close()


async def test_an_account_over_its_log_quota_gets_its_log_closed_with_a_reason(
    database_url: str, tmp_path: Path
) -> None:
    quota = 4096
    control = _disk_control(database_url, DiskSettings(account_log_quota_bytes=quota))
    await control.start()
    api = Api(control.plane.grpc_address, control.admin_token)
    proto = ProtocolRunner(control.plane.grpc_address, control.runner_token)
    await proto.start()
    try:
        repo = make_repo(tmp_path / "r")
        build, assignment = await _assigned(control, api, proto, repo, "quota")
        line = "x" * 1000
        await proto.append(assignment, 1, [line] * 5)  # 5 KB: over the quota now
        reply = await proto.append(assignment, 2, ["over"])
        assert (reply.last_line, reply.duplicate) == (6, False)
        # Later batches are acknowledged and dropped: the runner never loops.
        reply = await proto.append(assignment, 3, ["dropped"])
        assert (reply.last_line, reply.duplicate) == (6, False)
        lines = await api.logs(build.id)
        assert [ln.text for ln in lines] == [line] * 5 + [quota_marker(quota)]
        assert lines[-1].stream == pb.LOG_STREAM_SYSTEM
        shown = await api.get(build.id)
        assert shown.status == pb.BUILD_STATUS_RUNNING
        assert any("log storage quota of 4 KiB is used up" in w for w in shown.warnings)
        metrics = await scrape(control.http_url + "/metrics")
        assert metrics.value("conveyor_log_batches_refused_total", reason="quota") == 2
    finally:
        await proto.close()
        await api.close()
        await control.stop()


async def test_an_external_database_is_measured_against_its_budget(database_url: str) -> None:
    db = Database(database_url)
    await db.open()
    try:
        logs = LogStore(db)
        size = await logs.database_size()
        assert size > 0
        metrics = ControlMetrics(CollectorRegistry())
        settings = DiskSettings(budget_bytes=size + MiB, min_free_bytes=2 * MiB)
        tight = LogAdmission(logs, settings, metrics.disk)
        assert isinstance(tight.probes[0], DatabaseBudgetProbe)
        state = await tight.check()
        assert state.low
        assert state.free_bytes is not None
        assert state.free_bytes <= MiB
        roomy_settings = DiskSettings(budget_bytes=size + 64 * MiB, min_free_bytes=2 * MiB)
        roomy = LogAdmission(logs, roomy_settings, metrics.disk)
        assert not (await roomy.check()).low
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONVEYOR_DISK_MIN_FREE", "12XB"),
        ("CONVEYOR_DISK_MIN_FREE", "1.5GiB"),
        ("CONVEYOR_DISK_MIN_FREE", "-1"),
        ("CONVEYOR_ACCOUNT_LOG_QUOTA", "lots"),
        ("CONVEYOR_DATABASE_DISK_BUDGET", "GiB"),
        ("CONVEYOR_DISK_CHECK_SECONDS", "0"),
    ],
)
def test_bad_disk_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.from_env({name: value})
    assert error.value.name == name


def test_disk_sizes_take_units() -> None:
    disk = Settings.from_env(
        {"CONVEYOR_DISK_MIN_FREE": "512MiB", "CONVEYOR_ACCOUNT_LOG_QUOTA": "2GB"}
    ).disk
    assert (disk.min_free_bytes, disk.account_log_quota_bytes) == (512 * MiB, 2_000_000_000)
    assert Settings.from_env({}).disk == DiskSettings()


class _SlowToStopProbe:
    """Answers the first measurement at once; the next one waits until
    cancelled, and its cleanup waits for ``release``."""

    name = "slow"

    def __init__(self) -> None:
        self.calls = 0
        self.measuring = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()

    async def free_bytes(self) -> int:
        self.calls += 1
        if self.calls == 1:
            return 10 * MiB
        self.measuring.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()
            await self.release.wait()
        raise AssertionError("unreachable")


async def test_stop_does_not_swallow_the_callers_own_cancellation() -> None:
    probe = _SlowToStopProbe()
    settings = DiskSettings(min_free_bytes=MiB, interval=0.01)
    admission = LogAdmission(
        LogStore(Database("postgresql:///unused")),
        settings,
        ControlMetrics(CollectorRegistry()).disk,
        [probe],
    )
    await admission.start()
    await asyncio.wait_for(probe.measuring.wait(), 5)
    stopper = asyncio.create_task(admission.stop())
    await asyncio.wait_for(probe.cancelled.wait(), 5)
    # The caller of stop is itself cancelled while the loop cleans up.
    stopper.cancel()
    await asyncio.sleep(0)
    assert not stopper.done()  # stop still waits for the loop to end
    probe.release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopper
