"""Real forge deliveries in their less common forms: GitHub's form-encoded
content type, tag deletions, tags in the list of pushes that did not build,
and the step a closed pull request's cancel stopped."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import runner_service_pb2 as rs
from conveyor.v1 import types_pb2 as pb
from tests.forge import samples
from tests.helpers import Api, ControlHandle, ProtocolRunner, cli, github_headers, post_webhook

REPO = "https://example.com/acme/web.git"
SHA = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
FORM = "application/x-www-form-urlencoded"


def form(payload: bytes) -> bytes:
    """A body as GitHub sends it with the form content type."""
    return urllib.parse.urlencode({"payload": payload.decode()}).encode()


async def send_form(
    control: ControlHandle, project: Any, body: bytes, event: str = "push", signed: bytes = b""
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as a form, signed over ``signed`` (the body itself by
    default, as GitHub does)."""
    headers = github_headers(project.webhook_secret, signed or body, event=event)
    headers["Content-Type"] = FORM
    return await post_webhook(f"{control.http_url}/webhooks/github/{project.id}", body, headers)


async def test_form_encoded_deliveries_are_read_like_json(control: ControlHandle, api: Api) -> None:
    project = await api.create_project("web", REPO)
    ping = json.dumps(samples.load("github/ping")).encode()
    assert await send_form(control, project, form(ping), event="ping") == (200, {"result": "ping"})
    got = await api.config.GetProject(cs.GetProjectRequest(project="web"), metadata=api.metadata)
    assert (got.project.forge, got.project.forge_repo) == ("github", "acme/web")
    status, reply = await send_form(control, project, form(samples.github_push("main", SHA)))
    assert (status, reply["result"]) == (202, "queued")
    build = await api.get(reply["build_id"])
    assert (build.branch, build.commit_sha, build.trigger) == ("main", SHA, "push")
    status, reply = await send_form(
        control, project, form(samples.github_pull_request("opened", 4, "changes", SHA)),
        event="pull_request",
    )  # fmt: skip
    assert (status, reply["result"]) == (202, "queued")


# (case, body, what it is signed over (the body when empty), status, error)
BAD_FORMS: list[tuple[str, bytes, bytes, int, str]] = [
    ("no payload field", b"other=1", b"", 400,
     f"a {FORM} body must carry the JSON payload in one form field 'payload'"),
    ("two payload fields", b"payload=%7B%7D&payload=%7B%7D", b"", 400,
     f"a {FORM} body must carry the JSON payload in one form field 'payload'"),
    ("JSON sent as a form", samples.github_push("main", SHA), b"", 400,
     f"a {FORM} body must carry the JSON payload in one form field 'payload'"),
    ("a field without a value", b"payload", b"", 400, f"the body is not a valid {FORM} form"),
    ("bytes that are not UTF-8", b"payload=\xff", b"", 400, f"the body is not a valid {FORM} form"),
    ("payload is not JSON", b"payload=%7Bnot+json", b"", 400, "the body is not valid JSON"),
    ("signed over the decoded JSON", form(samples.github_push("main", SHA)),
     samples.github_push("main", SHA), 401, "signature or token does not match"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "body", "signed", "status", "error"), BAD_FORMS, ids=[c[0] for c in BAD_FORMS]
)
async def test_bad_forms_are_refused_with_a_sentence(
    control: ControlHandle,
    api: Api,
    label: str,
    body: bytes,
    signed: bytes,
    status: int,
    error: str,
) -> None:
    project = await api.create_project("web", REPO)
    got_status, reply = await send_form(control, project, body, signed=signed)
    assert (got_status, reply["error"]) == (status, error)
    listed = await api.config.ListBuilds(cs.ListBuildsRequest(), metadata=api.metadata)
    assert list(listed.builds) == []


def github_tag_deletion(tag: str) -> bytes:
    payload = samples.load("github/push_delete")
    payload["ref"] = f"refs/tags/{tag}"
    return json.dumps(payload).encode()


def gitlab_tag_deletion(tag: str) -> bytes:
    # GitLab's documented tag deletion: "after" all zeros, no checkout_sha.
    payload = samples.load("gitlab/tag_push")
    payload.update(ref=f"refs/tags/{tag}", after=samples.ZERO, checkout_sha=None)
    return json.dumps(payload).encode()


async def test_tag_pushes_and_deletions_are_shown_as_tags(control: ControlHandle, api: Api) -> None:
    project = await api.create_project("web", REPO)
    url = control.http_url
    sent = [
        (await samples.send_github(url, project, samples.github_tag("v1.0.0", SHA)),
         "skipped: tag push"),
        (await samples.send_github(url, project, github_tag_deletion("v1.0.0")),
         "skipped: tag deleted"),
        (await samples.send_gitlab(url, project, gitlab_tag_deletion("v2"), "Tag Push Hook"),
         "skipped: tag deleted"),
    ]  # fmt: skip
    for (status, reply), reason in sent:
        assert (status, reply["reason"]) == (200, reason)
    value = control.plane.registry.get_sample_value(
        "conveyor_pushes_skipped_total", {"provider": "github", "reason": "tag_deleted"}
    )
    assert value == 1
    listed = await api.config.ListBuilds(
        cs.ListBuildsRequest(include_skipped=True), metadata=api.metadata
    )
    assert [(s.ref, s.branch, s.commit_sha, s.reason) for s in listed.skipped] == [
        ("refs/tags/v2", "", "", "skipped: tag deleted"),
        ("refs/tags/v1.0.0", "", "", "skipped: tag deleted"),
        ("refs/tags/v1.0.0", "", SHA, "skipped: tag push"),
    ]
    code, out, err = await cli(control, "builds", "list", "--all", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["tag"], r["branch"], r["status_reason"]) for r in rows] == [
        ("v2", None, "skipped: tag deleted"),
        ("v1.0.0", None, "skipped: tag deleted"),
        ("v1.0.0", None, "skipped: tag push"),
    ]
    code, out, err = await cli(control, "builds", "list", "--all")
    assert code == 0, err
    assert "refs/tags" not in out
    assert [" tag v2 " in line or " tag v1.0.0 " in line for line in out.splitlines()] == [True] * 3


# (case, the step's exit code, whether the build was asked to stop, the
# step's status afterwards)
STEP_ENDS: list[tuple[str, int, bool, int]] = [
    ("SIGTERM after the pull request closed", 143, True, pb.STEP_STATUS_CANCELED),
    ("SIGKILL after the pull request closed", 137, True, pb.STEP_STATUS_CANCELED),
    ("a failure of its own after the close", 1, True, pb.STEP_STATUS_FAILED),
    ("SIGTERM nobody asked for", 143, False, pb.STEP_STATUS_FAILED),
]


@pytest.mark.parametrize(
    ("label", "exit_code", "closed", "step_status"), STEP_ENDS, ids=[c[0] for c in STEP_ENDS]
)
async def test_a_step_stopped_by_a_closed_pull_request_is_canceled(
    control: ControlHandle,
    api: Api,
    proto_runner: ProtocolRunner,
    label: str,
    exit_code: int,
    closed: bool,
    step_status: int,
) -> None:
    project = await api.create_project("web", REPO, preview_command="./preview.sh")
    url = control.http_url
    _, opened = await samples.send_github(
        url, project, samples.github_pull_request("opened", 5, "changes", SHA), "pull_request"
    )
    assignment = await proto_runner.next_assignment()
    running = rs.StepUpdate(index=1, name="build", status=pb.STEP_STATUS_RUNNING)
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING, steps=[running])
    if closed:
        status, reply = await samples.send_github(
            url, project, samples.github_pull_request("closed", 5, "changes", SHA), "pull_request"
        )
        assert (status, reply["build_ids"]) == (200, [opened["build_id"]])
        assert (await proto_runner.cancels.get()).build_id == opened["build_id"]
    # What the runner reports when the script's step ends: its exit code.
    ended = rs.StepUpdate(
        index=1, name="build", status=pb.STEP_STATUS_FAILED, exit_code=exit_code,
        has_exit_code=True,
    )  # fmt: skip
    final = pb.BUILD_STATUS_CANCELED if closed else pb.BUILD_STATUS_FAILED
    await proto_runner.report(assignment, final, steps=[ended])
    build = await api.wait_status(opened["build_id"])
    assert build.status == final
    step = build.steps[1]
    assert (step.name, step.status, step.exit_code) == ("build", step_status, exit_code)
    if closed:
        assert build.status_reason == "canceled by pull request #5 closed"
