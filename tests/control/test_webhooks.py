"""Webhooks over real HTTP: signatures, events, dedupe, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from control.webhooks import github
from tests.helpers import (
    Api,
    ControlHandle,
    git,
    github_headers,
    github_push,
    post_webhook,
)


async def build_count(control: ControlHandle) -> int:
    async with control.plane.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM builds")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
async def project(api: Api, repo: Path) -> dict[str, str]:
    created = await api.create_project("hooked", repo)
    return {
        "id": created.id,
        "secret": created.webhook_secret,
        "sha": git(repo, "rev-parse", "HEAD"),
    }


def test_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"zen": "Keep it logically awesome."}'
    # The example from GitHub's "Validating webhook deliveries" page.
    assert github.signature("It's a Secret to Everybody", b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )
    sig = github.signature("s3cret", body)
    assert github.verify("s3cret", body, sig)
    assert not github.verify("s3cret", body + b" ", sig)
    assert not github.verify("other", body, sig)
    assert not github.verify("s3cret", body, None)
    assert not github.verify("s3cret", body, "sha1=" + sig.removeprefix("sha256="))
    assert not github.verify("", body, github.signature("", body))


async def test_valid_push_queues_a_build_at_the_pushed_commit(
    control: ControlHandle, api: Api, project: dict[str, str]
) -> None:
    body = github_push("main", project["sha"])
    status, reply = await post_webhook(
        f"{control.http_url}/webhooks/github/{project['id']}",
        body,
        github_headers(project["secret"], body),
    )
    assert status == 202
    build = await api.get(reply["build_id"])
    assert build.commit_sha == project["sha"]
    assert build.branch == "main"
    assert build.trigger == "push"


async def test_bad_signature_is_401_and_queues_nothing(
    control: ControlHandle, project: dict[str, str]
) -> None:
    body = github_push("main", project["sha"])
    headers = github_headers("not-the-secret", body)
    status, reply = await post_webhook(
        f"{control.http_url}/webhooks/github/{project['id']}", body, headers
    )
    assert status == 401
    assert reply["result"] == "bad_signature"
    headers.pop("X-Hub-Signature-256")
    status, _ = await post_webhook(
        f"{control.http_url}/webhooks/github/{project['id']}", body, headers
    )
    assert status == 401
    assert await build_count(control) == 0


async def test_ping_is_200_and_queues_nothing(
    control: ControlHandle, project: dict[str, str]
) -> None:
    body = json.dumps({"zen": "Design for failure.", "hook_id": 1}).encode()
    status, reply = await post_webhook(
        f"{control.http_url}/webhooks/github/{project['id']}",
        body,
        github_headers(project["secret"], body, event="ping"),
    )
    assert (status, reply["result"]) == (200, "ping")
    assert await build_count(control) == 0


async def test_replayed_delivery_queues_one_build(
    control: ControlHandle, project: dict[str, str]
) -> None:
    body = github_push("main", project["sha"])
    headers = github_headers(project["secret"], body, delivery="delivery-1")
    url = f"{control.http_url}/webhooks/github/{project['id']}"
    first = await post_webhook(url, body, headers)
    second = await post_webhook(url, body, headers)
    assert first[0] == 202
    assert second == (
        200,
        {
            "result": "duplicate",
            "reason": "delivery already processed",
            "build_id": first[1]["build_id"],
        },
    )
    assert await build_count(control) == 1


@pytest.mark.parametrize(
    ("body", "status", "result"),
    [
        (b"{not json", 400, "malformed"),
        (b'{"ref": "refs/heads/main"}', 400, "malformed"),
        (b'{"ref": "refs/heads/main", "after": "abc"}', 400, "malformed"),
        (b'{"ref": "refs/tags/v1", "after": "' + b"1" * 40 + b'"}', 200, "skipped"),
        (b'{"ref": "refs/heads/main", "after": "' + b"0" * 40 + b'"}', 200, "skipped"),
        (b"[]", 400, "malformed"),
    ],
)
async def test_bad_or_non_building_pushes_queue_nothing(
    control: ControlHandle, project: dict[str, str], body: bytes, status: int, result: str
) -> None:
    got_status, reply = await post_webhook(
        f"{control.http_url}/webhooks/github/{project['id']}",
        body,
        github_headers(project["secret"], body),
    )
    assert (got_status, reply["result"]) == (status, result)
    assert await build_count(control) == 0


async def test_unknown_project_is_404(control: ControlHandle) -> None:
    body = github_push("main", "1" * 40)
    for project_id in ("00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        status, reply = await post_webhook(
            f"{control.http_url}/webhooks/github/{project_id}",
            body,
            github_headers("x", body),
        )
        assert (status, reply["result"]) == (404, "unknown_project")


async def test_unsupported_event_is_202_ignored(
    control: ControlHandle, project: dict[str, str]
) -> None:
    body = b'{"action": "created"}'
    status, reply = await post_webhook(
        f"{control.http_url}/webhooks/github/{project['id']}",
        body,
        github_headers(project["secret"], body, event="issues"),
    )
    assert (status, reply["result"]) == (202, "ignored")
    assert await build_count(control) == 0


async def test_oversized_body_is_413(control: ControlHandle, project: dict[str, str]) -> None:
    body = b'{"pad": "' + b"x" * (6 * 1024 * 1024) + b'"}'
    status, reply = await post_webhook(
        f"{control.http_url}/webhooks/github/{project['id']}",
        body,
        github_headers(project["secret"], body),
    )
    assert (status, reply["result"]) == (413, "too_large")
    assert await build_count(control) == 0


async def test_gitlab_push_with_the_right_token_queues_a_build(
    control: ControlHandle, api: Api, project: dict[str, str]
) -> None:
    body = json.dumps(
        {
            "object_kind": "push",
            "ref": "refs/heads/main",
            "before": "0" * 40,
            "after": project["sha"],
            "checkout_sha": project["sha"],
            "commits": [{"id": project["sha"], "message": "change"}],
        }
    ).encode()
    url = f"{control.http_url}/webhooks/gitlab/{project['id']}"
    headers = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": "u-1"}
    status, _ = await post_webhook(url, body, {**headers, "X-Gitlab-Token": "wrong"})
    assert status == 401
    status, reply = await post_webhook(url, body, {**headers, "X-Gitlab-Token": project["secret"]})
    assert status == 202
    build = await api.get(reply["build_id"])
    assert build.commit_sha == project["sha"]
    status, reply = await post_webhook(url, body, {**headers, "X-Gitlab-Token": project["secret"]})
    assert (status, reply["result"]) == (200, "duplicate")
