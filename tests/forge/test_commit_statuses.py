"""Commit statuses back to the forge: each state change of a build reaches
the GitHub or GitLab fake in order, with a link to the build; a forge that
is down is retried with backoff, never fails or delays the build, and shows
in the metrics and on the build."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from control.forge.links import Links
from control.forge.reporter import StatusReporter
from control.metrics import ForgeMetrics
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab
from tests.forge import samples
from tests.forge.conftest import TOKEN
from tests.helpers import Api, ControlHandle, ProtocolRunner

REPO = "https://example.com/acme/web.git"
SHA = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
SHA2 = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


async def connect(
    api: Api, fake: FakeGitHub | FakeGitLab, *, token: str | None = TOKEN, **fields: Any
) -> pb.Project:
    """A project whose statuses go to ``fake``, with the FORGE_TOKEN secret."""
    if isinstance(fake, FakeGitHub):
        fields = {"forge": "github", "forge_repo": "acme/web", **fields}
    else:
        fields = {"forge": "gitlab", "forge_repo": "15", "production_branch": "master", **fields}
    project = await api.create_project("web", REPO, forge_api_url=fake.url, **fields)
    if token is not None:
        await api.config.SetEnvVar(
            cs.SetEnvVarRequest(project="web", name="FORGE_TOKEN", value=token, secret=True),
            metadata=api.metadata,
        )
    return project


def metric(control: ControlHandle, name: str, **labels: str) -> float:
    return control.plane.registry.get_sample_value(name, labels) or 0.0


async def metric_grows(control: ControlHandle, name: str, above: float, **labels: str) -> None:
    """Wait until the metric exceeds ``above``: proof that the reporter
    handled an event, so a check that nothing was sent is not a guess."""
    deadline = time.monotonic() + 10
    while metric(control, name, **labels) <= above:
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {above}"
        await asyncio.sleep(0.02)


async def eventually_warned(api: Api, build_id: str, timeout: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        build = await api.get(build_id)
        if build.warnings:
            return list(build.warnings)
        assert time.monotonic() < deadline, "no warning on the build"
        await asyncio.sleep(0.05)


async def test_a_push_build_reports_pending_then_success_to_github(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, github_api: FakeGitHub
) -> None:
    project = await connect(api, github_api)
    status, reply = await samples.send_github(
        control.http_url, project, samples.github_push("main", SHA)
    )
    assert status == 202
    build_id = reply["build_id"]
    await github_api.wait_for(lambda: github_api.states(SHA) == ["pending"], what="queued")
    assignment = await proto_runner.next_assignment()
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    await github_api.wait_for(lambda: len(github_api.statuses) == 2, what="running")
    await proto_runner.report(assignment, pb.BUILD_STATUS_SUCCEEDED)
    await github_api.wait_for(lambda: github_api.states(SHA)[-1:] == ["success"], what="success")
    sent = github_api.statuses
    assert [(s["state"], s["description"]) for s in sent] == [
        ("pending", "Build queued"),
        ("pending", "Build running"),
        ("success", "Build succeeded"),
    ]
    assert {s["context"] for s in sent} == {"conveyor/web"}
    assert {s["target_url"] for s in sent} == {f"{control.http_url}/builds/{build_id}"}
    request = github_api.received[0]
    assert request.path == f"/repos/acme/web/statuses/{SHA}"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Accept"] == "application/vnd.github+json"
    assert metric(control, "conveyor_forge_status_reports_total", forge="github",
                  result="delivered") == 3  # fmt: skip
    assert metric(control, "conveyor_forge_up", forge="github") == 1
    assert (await api.get(build_id)).warnings == []


async def test_gitlab_gets_pending_running_and_failed_with_the_reason(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, gitlab_api: FakeGitLab
) -> None:
    project = await connect(api, gitlab_api)
    status, reply = await samples.send_gitlab(
        control.http_url, project, samples.gitlab_push("master", SHA)
    )
    assert status == 202
    await gitlab_api.wait_for(lambda: gitlab_api.states() == ["pending"], what="queued")
    assignment = await proto_runner.next_assignment()
    await proto_runner.report(assignment, pb.BUILD_STATUS_INITIALIZING)
    await gitlab_api.wait_for(lambda: gitlab_api.states()[-1:] == ["running"], what="starting")
    # GitLab refuses running -> running ("Cannot transition status via :run
    # from :running"): that answer means the status already says so.
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    await gitlab_api.wait_for(lambda: len(gitlab_api.received) == 3, what="running again")
    await proto_runner.report(
        assignment, pb.BUILD_STATUS_FAILED, reason="exit_code=2 in step build"
    )
    await gitlab_api.wait_for(lambda: gitlab_api.states()[-1:] == ["failed"], what="failed")
    assert [r.status for r in gitlab_api.received] == [201, 201, 400, 201]
    assert gitlab_api.states() == ["pending", "running", "failed"]
    last = gitlab_api.statuses[-1]
    assert last["description"] == "Build failed: exit_code=2 in step build"
    assert (last["name"], last["ref"], last["project"]) == ("conveyor/web", "master", "15")
    assert gitlab_api.received[0].headers["PRIVATE-TOKEN"] == TOKEN
    assert gitlab_api.received[0].path == f"/api/v4/projects/15/statuses/{SHA}"
    assert metric(control, "conveyor_forge_status_reports_total", forge="gitlab",
                  result="delivered") == 4  # fmt: skip
    assert (await api.get(reply["build_id"])).warnings == []


async def test_a_forge_answering_503_is_retried_with_backoff(
    control: ControlHandle, api: Api, github_api: FakeGitHub
) -> None:
    project = await connect(api, github_api)
    github_api.fail_next = 2
    await samples.send_github(control.http_url, project, samples.github_push("main", SHA))
    await github_api.wait_for(lambda: github_api.states(SHA) == ["pending"], what="delivery")
    assert [r.status for r in github_api.received] == [503, 503, 201]
    assert metric(control, "conveyor_forge_status_reports_total", forge="github",
                  result="retried") == 2  # fmt: skip
    assert metric(control, "conveyor_forge_up", forge="github") == 1


async def test_a_forge_that_stays_down_never_delays_the_build_and_shows(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, github_api: FakeGitHub
) -> None:
    project = await connect(api, github_api)
    github_api.mode = "503"
    status, reply = await samples.send_github(
        control.http_url, project, samples.github_push("main", SHA)
    )
    assert status == 202
    build_id = reply["build_id"]
    assignment = await proto_runner.next_assignment()
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    await proto_runner.report(assignment, pb.BUILD_STATUS_SUCCEEDED)
    build = await api.wait_status(build_id)
    assert build.status == pb.BUILD_STATUS_SUCCEEDED
    warnings = await eventually_warned(api, build_id)
    assert warnings[0].startswith("forge unreachable: the 'success' commit status was not")
    assert "HTTP 503" in warnings[0]
    assert metric(control, "conveyor_forge_up", forge="github") == 0
    assert metric(control, "conveyor_forge_status_reports_total", forge="github",
                  result="failed") >= 1  # fmt: skip
    async with control.plane.db.connection() as conn:
        cur = await conn.execute(
            "SELECT state, delivered_at, attempts, last_error FROM forge_status_reports"
            " WHERE build_id = %s",
            (build_id,),
        )
        row = await cur.fetchone()
    assert row is not None
    assert (row[0], row[1], row[2]) == ("success", None, 4)
    assert "503" in row[3]


@pytest.mark.timing  # webhook and report calls under 1 s while the forge hangs 2.5 s
async def test_a_forge_that_hangs_slows_no_webhook_and_no_runner_report(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, github_api: FakeGitHub
) -> None:
    project = await connect(api, github_api)
    github_api.mode = "slow"
    github_api.slow_seconds = 2.5  # past the reporter's 2 s request timeout

    async def timed(call: Any) -> float:
        began = time.monotonic()
        await call
        return time.monotonic() - began

    took = [await timed(samples.send_github(
        control.http_url, project, samples.github_push("main", SHA)
    ))]  # fmt: skip
    assignment = await proto_runner.next_assignment()
    took.append(await timed(proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)))
    took.append(await timed(proto_runner.report(assignment, pb.BUILD_STATUS_SUCCEEDED)))
    # Wall clock: each call takes milliseconds unless it waits on the 2.5 s
    # forge; 1 s tells the two apart even on a loaded machine.
    assert max(took) < 1.0, took
    await github_api.wait_for(lambda: len(github_api.received) >= 1, what="a hanging request")
    assert (await api.get(assignment.build_id)).status == pb.BUILD_STATUS_SUCCEEDED


async def test_a_forge_refusing_connections_recovers_on_the_next_change(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, github_api: FakeGitHub
) -> None:
    project = await connect(api, github_api)
    await github_api.refuse()
    _, reply = await samples.send_github(
        control.http_url, project, samples.github_push("main", SHA)
    )
    build_id = reply["build_id"]
    warnings = await eventually_warned(api, build_id)
    assert "forge unreachable: the 'pending' commit status" in warnings[0]
    assert metric(control, "conveyor_forge_up", forge="github") == 0
    await github_api.up()
    assignment = await proto_runner.next_assignment()
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    await proto_runner.report(assignment, pb.BUILD_STATUS_SUCCEEDED)
    await github_api.wait_for(lambda: github_api.states(SHA)[-1:] == ["success"], what="success")
    assert metric(control, "conveyor_forge_up", forge="github") == 1


async def test_a_rejected_status_is_not_retried_and_shows_on_the_build(
    control: ControlHandle, api: Api, github_api: FakeGitHub
) -> None:
    project = await connect(api, github_api, token="not-the-token")
    _, reply = await samples.send_github(
        control.http_url, project, samples.github_push("main", SHA)
    )
    warnings = await eventually_warned(api, reply["build_id"])
    assert warnings == ["forge rejected the 'pending' commit status: HTTP 401: Bad credentials"]
    assert [r.status for r in github_api.received] == [401]
    assert metric(control, "conveyor_forge_status_reports_total", forge="github",
                  result="rejected") == 1  # fmt: skip


async def test_no_token_no_status(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, github_api: FakeGitHub
) -> None:
    project = await connect(api, github_api, token=None)
    skipped = ("conveyor_forge_status_reports_total", {"forge": "github", "result": "skipped"})
    _, reply = await samples.send_github(
        control.http_url, project, samples.github_push("main", SHA)
    )
    assignment = await proto_runner.next_assignment()
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    await proto_runner.report(assignment, pb.BUILD_STATUS_SUCCEEDED)
    assert (await api.wait_status(reply["build_id"])).status == pb.BUILD_STATUS_SUCCEEDED
    # Queued, running and succeeded were each handled (and skipped: no token).
    await metric_grows(control, skipped[0], 2, **skipped[1])
    assert github_api.received == []


async def test_a_superseded_build_says_so_unless_a_newer_build_owns_its_commit(
    control: ControlHandle, api: Api, github_api: FakeGitHub
) -> None:
    # No runner: builds stay queued, so a newer push supersedes them.
    project = await connect(api, github_api)
    url = control.http_url
    await samples.send_github(url, project, samples.github_push("main", SHA))
    await github_api.wait_for(lambda: github_api.states(SHA) == ["pending"], what="first")
    await samples.send_github(url, project, samples.github_push("main", SHA2))
    await github_api.wait_for(lambda: github_api.states(SHA) == ["pending", "error"], what="old")
    await github_api.wait_for(lambda: github_api.states(SHA2) == ["pending"], what="new")
    old = [s for s in github_api.statuses if s["sha"] == SHA][-1]
    assert old["description"].startswith("Build superseded: superseded by build ")
    # The same commit built again (a push of it within the hour answers with
    # the build it queued, so trigger it): the newer build owns the commit's
    # status, so the superseded one sends nothing that could hide it.
    labels = {"forge": "github", "result": "skipped"}
    before = metric(control, "conveyor_forge_status_reports_total", **labels)
    await api.trigger("web", branch="main", commit_sha=SHA2)
    await github_api.wait_for(lambda: github_api.states(SHA2) == ["pending", "pending"], what="2")
    # The superseded build's report was handled and skipped, not just late.
    await metric_grows(control, "conveyor_forge_status_reports_total", before, **labels)
    assert github_api.states(SHA2) == ["pending", "pending"]


async def test_reporting_never_blocks_the_lifecycle(control: ControlHandle, api: Api) -> None:
    """A full queue drops (and counts) updates; a failing listener is
    logged; neither stops a build from being queued."""
    registry = CollectorRegistry()
    metrics = ForgeMetrics(registry)
    reporter = StatusReporter(control.plane.lifecycle, metrics, Links(), queue_size=1, workers=0)
    await reporter.start()

    def broken(build_id: str) -> None:
        raise RuntimeError("listener bug")

    control.plane.lifecycle.listeners.append(broken)
    try:
        await api.create_project("web", REPO)
        first = await api.trigger("web", commit_sha=SHA)
        second = await api.trigger("web", branch="other", commit_sha=SHA2)
    finally:
        control.plane.lifecycle.listeners.remove(broken)
        await reporter.stop(drain_seconds=0)
    assert first.status == second.status == pb.BUILD_STATUS_QUEUED
    dropped = registry.get_sample_value(
        "conveyor_forge_status_reports_total", {"forge": "", "result": "dropped"}
    )
    assert dropped == 1
