"""The issue's "done when": a build run through `conveyor up` (a real process
tree: control plane plus runner child) moves the metrics of both processes,
its JSON log lines carry its build id, and reflection lists the services."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpc import aio

from common.logging_setup import release
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import build_manager_pb2_grpc as bm_grpc
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc as cs_grpc
from conveyor.v1 import types_pb2 as pb
from tests.helpers import FINAL, git, github_headers, github_push, post_webhook
from tests.observability.reflection import list_services
from tests.observability.scrape import Scrape, get_json, scrape_until

CAPACITY = 2


class UpProcess:
    """`conveyor up --log-format json` on port 0 with stdout and stderr in files."""

    def __init__(self, tmp: Path, database_url: str) -> None:
        self.data_dir = tmp / "data"
        self.out_path = tmp / "up.out"
        self.err_path = tmp / "up.err"
        self.database_url = database_url
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conveyor_cli.main", "up",
                "--data-dir", str(self.data_dir), "--grpc-port", "0", "--http-port", "0",
                "--log-format", "json", "--capacity", str(CAPACITY),
                # The session's PostgreSQL instead of a second embedded one:
                # the same code path as production (CONVEYOR_DATABASE_URL).
                env={**os.environ, "CONVEYOR_DATABASE_URL": self.database_url},
                stdout=out, stderr=err, start_new_session=True,
            )  # fmt: skip

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    async def wait_for(self, what: str, found: Any, timeout: float = 60) -> Any:
        """Poll ``found()`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"conveyor up exited while waiting for {what}:\n{self.stderr()}"
                )
            result = found()
            if result:
                return result
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout} s:\n{self.stdout()}\n{self.stderr()}")

    def state(self) -> dict[str, str] | None:
        path = self.data_dir / "conveyor.json"
        try:
            state: dict[str, str] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return state if "http_url" in state else None

    async def stop(self) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 40)
        except TimeoutError:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
            raise AssertionError(f"conveyor up ignored SIGTERM:\n{self.stderr()}") from None


async def wait_final(config: cs_grpc.ConfigServiceStub, metadata: Any, build_id: str) -> pb.Build:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        reply = await config.GetBuild(cs.GetBuildRequest(build_id=build_id), metadata=metadata)
        if reply.build.status in FINAL:
            return reply.build
        await asyncio.sleep(0.05)
    raise AssertionError(f"build {build_id} did not finish")


def finished(count: int, name: str) -> Callable[[Scrape], bool]:
    """The scrape shows ``count`` succeeded builds in ``name``."""
    label = "result" if name.startswith("conveyor_runner_") else "status"
    return lambda metrics: metrics.value(name, **{label: "succeeded"}) >= count


async def test_a_build_through_conveyor_up_moves_both_metrics_and_tags_its_log_lines(
    tmp_path: Path, database_url: str
) -> None:
    up = UpProcess(tmp_path, database_url)
    await up.start()
    try:
        state: dict[str, str] = await up.wait_for("conveyor.json", up.state)
        demo = await up.wait_for(
            "the demo build's end",
            lambda: re.search(r"demo: build ([0-9a-f-]{36}) (\w+)\.", up.stdout()),
        )
        first_id, first_status = demo.group(1), demo.group(2)
        assert first_status == "succeeded", up.stdout()

        control_url = state["http_url"] + "/metrics"
        runner_url = state["runner_metrics_url"]
        control_1 = await scrape_until(control_url, finished(1, "conveyor_builds_finished_total"))
        runner_1 = await scrape_until(runner_url, finished(1, "conveyor_runner_builds_total"))
        # The demo build, from fresh processes: these started at zero.
        assert control_1.value("conveyor_builds_finished_total", status="succeeded") == 1
        assert control_1.value("conveyor_build_queue_seconds_count") == 1
        assert control_1.value("conveyor_log_lines_ingested_total") > 0
        assert runner_1.value("conveyor_runner_builds_total", result="succeeded") == 1
        assert runner_1.value("conveyor_runner_launch_seconds_count") == 1
        assert runner_1.value("conveyor_runner_log_batches_sent_total") > 0

        # A second build, from a signed push to the demo project.
        metadata = (("authorization", f"Bearer {state['token']}"),)
        async with aio.insecure_channel(state["grpc_address"]) as channel:
            config = cs_grpc.ConfigServiceStub(channel)
            # The webhook secret is shown only at creation and on a rotate.
            project = (
                await config.RotateWebhookSecret(
                    cs.RotateWebhookSecretRequest(project="demo"), metadata=metadata
                )
            ).project
            sha = await asyncio.to_thread(git, up.data_dir / "demo-repo", "rev-parse", "HEAD")
            body = github_push("main", sha)
            status, reply = await post_webhook(
                f"{state['http_url']}/webhooks/github/{project.id}",
                body,
                github_headers(project.webhook_secret, body),
            )
            assert status == 202, reply
            second_id = str(reply["build_id"])
            second = await wait_final(config, metadata, second_id)
            assert second.status == pb.BUILD_STATUS_SUCCEEDED
            stored = 0
            async for message in bm_grpc.BuildManagerStub(channel).StreamLogs(
                bm.StreamLogsRequest(build_id=second_id), metadata=metadata
            ):
                stored += len(message.lines)
            services = await asyncio.to_thread(list_services, state["grpc_address"])

        control_2 = await scrape_until(control_url, finished(2, "conveyor_builds_finished_total"))
        runner_2 = await scrape_until(runner_url, finished(2, "conveyor_runner_builds_total"))
        check_control_moved(control_1, control_2, stored)
        check_runner_moved(runner_1, runner_2)
        assert {
            "conveyor.v1.ConfigService",
            "conveyor.v1.SchedulerService",
            "conveyor.v1.BuildManager",
            "conveyor.v1.RunnerService",
            "grpc.health.v1.Health",
        } <= set(services)

        for url in (state["http_url"] + "/healthz", state["http_url"] + "/readyz"):
            code, answer = await get_json(url)
            assert code == 200, (url, answer)
        code, answer = await get_json(runner_url.replace("/metrics", "/healthz"))
        assert code == 200, answer
    finally:
        exit_code = await up.stop()
    assert exit_code == 0, up.stderr()
    check_log_lines(up.stderr(), [first_id, second_id], project.id)


def check_control_moved(before: Scrape, after: Scrape, stored_lines: int) -> None:
    """One more build went queued → running → succeeded through every layer."""

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("conveyor_builds_queued_total", trigger="push") == 1
    assert delta("conveyor_builds_finished_total", status="succeeded") == 1
    assert delta("conveyor_build_queue_seconds_count") == 1
    assert delta("conveyor_push_to_running_seconds_count") == 1
    assert delta("conveyor_build_duration_seconds_count", status="succeeded") == 1
    assert delta("conveyor_log_lines_ingested_total") == stored_lines > 0
    assert delta("conveyor_log_bytes_ingested_total") > 0
    assert delta("conveyor_webhooks_total", provider="github", result="queued") == 1
    assert delta("conveyor_scheduler_decisions_total", decision="started") == 1
    assert delta("conveyor_scheduler_tick_seconds_count") > 0
    assert delta("conveyor_grpc_requests_total", method="StartBuild", code="OK") == 1
    # initializing, running, the steps and the final status.
    assert delta("conveyor_grpc_requests_total", method="ReportStatus", code="OK") >= 3
    assert delta("conveyor_grpc_requests_total", method="AppendLogs", code="OK") >= 1
    assert delta("conveyor_grpc_request_seconds_count", method="AppendLogs") >= 1
    assert delta("conveyor_grpc_requests_total", method="StreamLogs", code="OK") == 1
    # Gauges: the runner is connected; nothing is active or waiting any more.
    assert after.value("conveyor_runners_connected") == 1
    assert after.value("conveyor_runner_capacity_slots") == CAPACITY
    assert after.value("conveyor_log_streams_active") == 0
    assert after.value("conveyor_active_builds") == 0
    assert after.series("conveyor_queue_depth") == {}
    assert after.value("conveyor_oldest_queued_build_age_seconds") == 0
    assert after.value("conveyor_db_pool_connections") >= 1
    assert after.value("conveyor_db_pool_connections") <= after.value(
        "conveyor_db_pool_max_connections"
    )
    assert delta("conveyor_db_pool_requests_total") > 0
    assert after.value("conveyor_db_pool_request_errors_total") == 0


def check_runner_moved(before: Scrape, after: Scrape) -> None:
    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("conveyor_runner_builds_total", result="succeeded") == 1
    assert delta("conveyor_runner_launch_seconds_count") == 1
    assert delta("conveyor_runner_log_batches_sent_total") >= 1
    assert after.value("conveyor_runner_log_batches_retried_total") == 0
    assert after.value("conveyor_runner_capacity_slots") == CAPACITY
    assert after.value("conveyor_runner_busy_slots") == 0


def check_log_lines(stderr: str, builds: list[str], project_id: str) -> None:
    """Every stderr line is a JSON object with the common fields, and each
    line about a build carries that build's id."""
    entries = []
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
        assert isinstance(entry, dict), line
        for key in ("time", "level", "message", "service", "logger"):
            assert entry.get(key), (key, line)
        assert entry["release"] == release(), line
        entries.append(entry)
    assert {e["service"] for e in entries} == {"conveyor-up", "conveyor-runner"}

    for build_id in builds:
        mentioning = [e for e in entries if build_id in e["message"]]
        assert all(e.get("build_id") == build_id for e in mentioning), mentioning
        tagged = [e for e in entries if e.get("build_id") == build_id]
        control = {e["message"] for e in tagged if e["service"] == "conveyor-up"}
        runner = {e["message"] for e in tagged if e["service"] == "conveyor-runner"}
        assert {"build queued", "build initializing", "build running", "build succeeded"} <= (
            control
        ), control
        assert any(m.startswith("build finished: succeeded") for m in runner), runner
        # The lifecycle names the build's project and account; the runner's
        # build task binds the build and its project for every line inside.
        transitions = [e for e in tagged if e["logger"] == "control.builds.lifecycle"]
        assert all(e.get("project_id") == project_id for e in transitions), transitions
        assert all(e.get("account_id") for e in transitions), transitions
        inside = [e for e in tagged if e["logger"] == "runner.build_run"]
        assert inside, tagged
        assert all(e.get("project_id") == project_id for e in inside), inside
    assert [e["message"] for e in entries][-1] == "control plane stopped"
    assert any(e["message"] == "stopping Conveyor" for e in entries)
