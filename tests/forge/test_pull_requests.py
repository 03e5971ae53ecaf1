"""Pull requests (GitHub) and merge requests (GitLab): opening or updating
one builds its head commit as a preview (the preview command instead of the
deploy command); closing it cancels its queued and running builds."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.fakes.github import FakeGitHub
from tests.forge import samples
from tests.forge.test_commit_statuses import connect
from tests.helpers import Api, ControlHandle, ProtocolRunner

REPO = "https://example.com/acme/web.git"
HEAD = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
HEAD2 = "9b1f3f3c1c7fb1e3c0a7d4c5e7f9a1b3c5d7e9f1"
PREVIEW = {"deploy_command": "./deploy.sh", "preview_command": "./preview.sh"}


@pytest_asyncio.fixture
async def one_slot_runner(control: ControlHandle) -> AsyncIterator[ProtocolRunner]:
    runner = ProtocolRunner(control.plane.grpc_address, control.runner_token, capacity=1)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.close()


async def test_an_opened_pull_request_builds_a_preview_with_pending_then_success(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, github_api: FakeGitHub
) -> None:
    project = await connect(api, github_api, build_other_branches=False, **PREVIEW)
    status, reply = await samples.send_github(
        control.http_url, project, samples.github_pull_request("opened", 2, "changes", HEAD),
        event="pull_request",
    )  # fmt: skip
    assert (status, reply["result"]) == (202, "queued")
    build = await api.get(reply["build_id"])
    assert (build.branch, build.commit_sha, build.trigger) == ("changes", HEAD, "pull_request")
    assert build.production is False
    assert [s.name for s in build.steps] == ["clone", "build", "preview"]
    await github_api.wait_for(lambda: github_api.states(HEAD) == ["pending"], what="pending")
    assignment = await proto_runner.next_assignment()
    assert list(assignment.step_commands)[-1] == "./preview.sh"
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    await proto_runner.report(assignment, pb.BUILD_STATUS_SUCCEEDED)
    await github_api.wait_for(lambda: github_api.states(HEAD)[-1:] == ["success"], what="success")
    described = [(s["state"], s["description"]) for s in github_api.statuses]
    assert described[0] == ("pending", "Preview queued")
    assert described[-1] == ("success", "Preview succeeded")


async def test_a_synchronized_pull_request_supersedes_its_queued_build(
    control: ControlHandle, api: Api
) -> None:
    project = await api.create_project("web", REPO, **PREVIEW)
    url = control.http_url
    _, first = await samples.send_github(
        url, project, samples.github_pull_request("opened", 3, "changes", HEAD), "pull_request"
    )
    _, second = await samples.send_github(
        url, project, samples.github_pull_request("synchronize", 3, "changes", HEAD2),
        "pull_request",
    )  # fmt: skip
    assert (await api.get(first["build_id"])).status == pb.BUILD_STATUS_SUPERSEDED
    newer = await api.get(second["build_id"])
    assert (newer.status, newer.commit_sha) == (pb.BUILD_STATUS_QUEUED, HEAD2)
    _, reopened = await samples.send_github(
        url, project, samples.github_pull_request("reopened", 3, "changes", HEAD2), "pull_request"
    )
    assert reopened["result"] == "queued"
    status, ignored = await samples.send_github(
        url, project, samples.github_pull_request("labeled", 3, "changes", HEAD2), "pull_request"
    )
    assert (status, ignored) == (
        202, {"result": "ignored", "reason": "pull request action 'labeled' does not build"},
    )  # fmt: skip


async def test_closing_a_pull_request_cancels_its_queued_and_running_builds(
    control: ControlHandle, api: Api, one_slot_runner: ProtocolRunner
) -> None:
    project = await api.create_project("web", REPO, **PREVIEW)
    url = control.http_url
    _, running = await samples.send_github(
        url, project, samples.github_pull_request("opened", 5, "changes", HEAD), "pull_request"
    )
    assignment = await one_slot_runner.next_assignment()
    await one_slot_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    # The only slot is busy: this one waits in the queue.
    _, queued = await samples.send_github(
        url, project, samples.github_pull_request("opened", 6, "other", HEAD2), "pull_request"
    )
    _, unrelated = await samples.send_github(url, project, samples.github_push("main", HEAD2))
    status, reply = await samples.send_github(
        url, project, samples.github_pull_request("closed", 6, "other", HEAD2), "pull_request"
    )
    assert (status, reply) == (200, {"result": "canceled", "build_ids": [queued["build_id"]]})
    canceled = await api.get(queued["build_id"])
    assert canceled.status == pb.BUILD_STATUS_CANCELED
    assert canceled.status_reason == "canceled by pull request #6 closed"
    status, reply = await samples.send_github(
        url, project, samples.github_pull_request("closed", 5, "changes", HEAD), "pull_request"
    )
    assert reply["build_ids"] == [running["build_id"]]
    cancel = await one_slot_runner.cancels.get()
    assert cancel.build_id == running["build_id"]
    await one_slot_runner.report(assignment, pb.BUILD_STATUS_CANCELED)
    stopped = await api.wait_status(running["build_id"])
    assert stopped.status == pb.BUILD_STATUS_CANCELED
    assert stopped.status_reason == "canceled by pull request #5 closed"
    assert (await api.get(unrelated["build_id"])).status == pb.BUILD_STATUS_QUEUED


async def test_gitlab_merge_requests_build_previews_and_cancel_on_merge(
    control: ControlHandle, api: Api
) -> None:
    project = await api.create_project("web", REPO, production_branch="master", **PREVIEW)
    url = control.http_url
    event = "Merge Request Hook"
    status, opened = await samples.send_gitlab(
        url, project, samples.gitlab_merge_request("open", 1, "ms-viewport", HEAD), event
    )
    assert (status, opened["result"]) == (202, "queued")
    build = await api.get(opened["build_id"])
    assert (build.branch, build.commit_sha, build.production, build.trigger) == (
        "ms-viewport", HEAD, False, "pull_request",
    )  # fmt: skip
    status, retitled = await samples.send_gitlab(
        url, project, samples.gitlab_merge_request("update", 1, "ms-viewport", HEAD), event
    )
    assert (status, retitled) == (
        202, {"result": "ignored", "reason": "merge request updated without new commits"},
    )  # fmt: skip
    status, pushed = await samples.send_gitlab(
        url, project,
        samples.gitlab_merge_request("update", 1, "ms-viewport", HEAD2, oldrev=HEAD), event,
    )  # fmt: skip
    assert (status, pushed["result"]) == (202, "queued")
    assert (await api.get(opened["build_id"])).status == pb.BUILD_STATUS_SUPERSEDED
    status, merged = await samples.send_gitlab(
        url, project, samples.gitlab_merge_request("merge", 1, "ms-viewport", HEAD2), event
    )
    assert (status, merged) == (200, {"result": "canceled", "build_ids": [pushed["build_id"]]})
    final = await api.get(pushed["build_id"])
    assert final.status == pb.BUILD_STATUS_CANCELED
    assert final.status_reason == "canceled by merge request !1 merged"


async def test_a_redelivered_pull_request_event_queues_once(
    control: ControlHandle, api: Api
) -> None:
    project = await api.create_project("web", REPO)
    body = samples.github_pull_request("opened", 9, "changes", HEAD)
    first = await samples.send_github(control.http_url, project, body, "pull_request", "pr-1")
    again = await samples.send_github(control.http_url, project, body, "pull_request", "pr-1")
    assert first[0] == 202
    assert again == (
        200,
        {
            "result": "duplicate",
            "reason": "delivery already processed",
            "build_id": first[1]["build_id"],
        },
    )
    status, bad = await samples.send_github(
        control.http_url, project, b'{"action": "opened", "number": 1}', "pull_request"
    )
    assert (status, bad["result"]) == (400, "malformed")
    assert "pull_request" in bad["error"]


async def test_a_pull_requests_builds_and_their_retries_carry_its_number(
    control: ControlHandle, api: Api, one_slot_runner: ProtocolRunner
) -> None:
    # The runner keys the build cache's scope on it (a fork names its branch
    # as it likes); a retry stays the request's, and closing it cancels it.
    project = await api.create_project("web", REPO, **PREVIEW)
    url = control.http_url
    _, opened = await samples.send_github(
        url, project, samples.github_pull_request("opened", 7, "main", HEAD), "pull_request"
    )
    assignment = await one_slot_runner.next_assignment()
    assert (assignment.build_id, assignment.pull_request) == (opened["build_id"], 7)
    assert (assignment.branch, assignment.production) == ("main", False)
    await one_slot_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    await one_slot_runner.report(assignment, pb.BUILD_STATUS_FAILED)
    await api.wait_status(opened["build_id"])
    retry = await api.config.RetryBuild(
        cs.RetryBuildRequest(build_id=opened["build_id"]), metadata=api.metadata
    )
    again = await one_slot_runner.next_assignment()
    assert (again.build_id, again.pull_request) == (retry.build.id, 7)
    status, reply = await samples.send_github(
        url, project, samples.github_pull_request("closed", 7, "main", HEAD), "pull_request"
    )
    assert (status, reply["build_ids"]) == (200, [retry.build.id])
    # A push to main is no request's.
    _, pushed = await samples.send_github(url, project, samples.github_push("main", HEAD2))
    await one_slot_runner.report(again, pb.BUILD_STATUS_CANCELED)
    push = await one_slot_runner.next_assignment()
    assert (push.build_id, push.pull_request, push.production) == (pushed["build_id"], 0, True)
