"""Replayed and hostile signed deliveries: the delivery id is not signed, so
the same signed push under a new id (or none) must not queue another build,
and a body nested 1,000 levels deep is a 400 with a sentence, never a 500."""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from control.webhooks.receiver import REPLAY_WINDOW
from tests.forge import samples
from tests.helpers import Api, ControlHandle, github_headers, post_webhook

REPO = "https://example.com/acme/web.git"
SHA = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
GITHUB_BODY = samples.github_push("main", SHA)
GITLAB_BODY = samples.gitlab_push("main", SHA)
FIRST = "first-delivery"
Delivery = Callable[[Any], tuple[str, bytes, dict[str, str]]]


def github(
    body: bytes, **headers: str | None
) -> Callable[[Any], tuple[str, bytes, dict[str, str]]]:
    """A GitHub delivery of ``body`` signed with the project's secret; a
    header given as None is left out."""

    def make(project: Any) -> tuple[str, bytes, dict[str, str]]:
        sent = github_headers(project.webhook_secret, body)
        sent.update({k: v for k, v in headers.items() if v is not None})
        for name in [k for k, v in headers.items() if v is None]:
            sent.pop(name, None)
        return f"/webhooks/github/{project.id}", body, sent

    return make


def gitlab(body: bytes, **headers: str) -> Delivery:
    """A GitLab delivery of ``body`` with the project's token and only the
    delivery headers given."""

    def make(project: Any) -> tuple[str, bytes, dict[str, str]]:
        sent = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": project.webhook_secret}
        return f"/webhooks/gitlab/{project.id}", body, {**sent, **headers}

    return make


def form(body: bytes) -> bytes:
    return b"payload=" + urllib.parse.quote_plus(body).encode()


FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}

# (case, the first delivery, the delivery sent after it, its status and
# result, whether it answers with the first delivery's build, builds after)
Case = tuple[str, Callable[[Any], Any], Callable[[Any], Any], int, str, bool, int]
CASES: list[Case] = [
    ("github: same body, new delivery id", github(GITHUB_BODY, **{"X-GitHub-Delivery": FIRST}),
     github(GITHUB_BODY), 200, "duplicate", True, 1),
    ("github: same body, same delivery id", github(GITHUB_BODY, **{"X-GitHub-Delivery": FIRST}),
     github(GITHUB_BODY, **{"X-GitHub-Delivery": FIRST}), 200, "duplicate", True, 1),
    ("github: same body, no delivery header", github(GITHUB_BODY),
     github(GITHUB_BODY, **{"X-GitHub-Delivery": None}), 400, "malformed", False, 1),
    ("github: same body, empty delivery header", github(GITHUB_BODY),
     github(GITHUB_BODY, **{"X-GitHub-Delivery": ""}), 400, "malformed", False, 1),
    ("github: same body, delivery id of 201 characters", github(GITHUB_BODY),
     github(GITHUB_BODY, **{"X-GitHub-Delivery": "d" * 201}), 400, "malformed", False, 1),
    ("github: same push as a form, new delivery id", github(GITHUB_BODY),
     github(form(GITHUB_BODY), **FORM_HEADERS), 200, "duplicate", True, 1),
    ("github: same commit pushed to another branch", github(GITHUB_BODY),
     github(samples.github_push("feature/x", SHA)), 202, "queued", False, 2),
    ("gitlab: same body, new Idempotency-Key", gitlab(GITLAB_BODY, **{"Idempotency-Key": FIRST}),
     gitlab(GITLAB_BODY, **{"Idempotency-Key": "another"}), 200, "duplicate", True, 1),
    ("gitlab: same body, same X-Gitlab-Event-UUID",
     gitlab(GITLAB_BODY, **{"X-Gitlab-Event-UUID": FIRST}),
     gitlab(GITLAB_BODY, **{"X-Gitlab-Event-UUID": FIRST}), 200, "duplicate", True, 1),
    ("gitlab: same body, no delivery header", gitlab(GITLAB_BODY, **{"Idempotency-Key": FIRST}),
     gitlab(GITLAB_BODY), 400, "malformed", False, 1),
]  # fmt: skip


async def build_ids(control: ControlHandle, project_id: str) -> list[str]:
    async with control.plane.db.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM builds WHERE project_id = %s ORDER BY created_at", (project_id,)
        )
        return [str(row[0]) for row in await cur.fetchall()]


async def send(
    control: ControlHandle, project: Any, make: Callable[[Any], Any]
) -> tuple[int, dict[str, Any]]:
    path, body, headers = make(project)
    return await post_webhook(f"{control.http_url}{path}", body, headers)


@pytest.mark.parametrize(
    ("label", "first", "again", "status", "result", "same_build", "builds"),
    CASES,
    ids=[c[0] for c in CASES],
)
async def test_a_replayed_push_queues_no_second_build(
    control: ControlHandle,
    api: Api,
    label: str,
    first: Callable[[Any], Any],
    again: Callable[[Any], Any],
    status: int,
    result: str,
    same_build: bool,
    builds: int,
) -> None:
    project = await api.create_project("web", REPO)
    first_status, queued = await send(control, project, first)
    assert (first_status, queued["result"]) == (202, "queued")
    got_status, reply = await send(control, project, again)
    assert (got_status, reply["result"]) == (status, result), reply
    if same_build:
        assert reply["build_id"] == queued["build_id"]
    if status == 400:
        # The sentence names the header a forge always sends.
        header = "X-GitHub-Delivery" if label.startswith("github") else "Idempotency-Key"
        assert header in reply["error"]
    assert len(await build_ids(control, project.id)) == builds


async def test_a_push_replayed_after_the_window_builds_again(
    control: ControlHandle, api: Api
) -> None:
    project = await api.create_project("web", REPO)
    _, first = await send(control, project, github(GITHUB_BODY))
    async with control.plane.db.transaction() as conn:
        await conn.execute(
            "UPDATE builds SET created_at = created_at - %s WHERE id = %s",
            (REPLAY_WINDOW + timedelta(minutes=1), first["build_id"]),
        )
    status, again = await send(control, project, github(GITHUB_BODY))
    assert (status, again["result"]) == (202, "queued")
    assert again["build_id"] != first["build_id"]


async def test_concurrent_replays_queue_one_build(control: ControlHandle, api: Api) -> None:
    project = await api.create_project("web", REPO)
    replies = await asyncio.gather(*(send(control, project, github(GITHUB_BODY)) for _ in range(8)))
    assert sorted(reply["result"] for _, reply in replies) == ["duplicate"] * 7 + ["queued"]
    ids = await build_ids(control, project.id)
    assert len(ids) == 1
    assert {reply["build_id"] for _, reply in replies} == set(ids)


def nested(levels: int) -> bytes:
    return b'{"ref": ' + b"[" * levels + b"]" * levels + b"}"


# (case, path under /webhooks, event header, content type, body, status, result)
NESTED: list[tuple[str, str, str, str, bytes, int, str]] = [
    ("github push", "github", "push", "application/json", nested(1000), 400, "malformed"),
    ("github push, 100,000 levels", "github", "push", "application/json", nested(100_000),
     400, "malformed"),
    ("github push as a form", "github", "push", FORM_HEADERS["Content-Type"],
     form(nested(1000)), 400, "malformed"),
    ("github pull_request", "github", "pull_request", "application/json", nested(1000),
     400, "malformed"),
    # A ping queues nothing whatever its body says.
    ("github ping", "github", "ping", "application/json", nested(1000), 200, "ping"),
    ("gitlab push", "gitlab", "Push Hook", "application/json", nested(1000), 400, "malformed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "forge", "event", "content_type", "body", "status", "result"),
    NESTED,
    ids=[c[0] for c in NESTED],
)
async def test_deeply_nested_json_is_a_400_with_a_sentence(
    control: ControlHandle,
    api: Api,
    label: str,
    forge: str,
    event: str,
    content_type: str,
    body: bytes,
    status: int,
    result: str,
) -> None:
    project = await api.create_project("web", REPO)
    if forge == "github":
        headers = github_headers(project.webhook_secret, body, event=event)
    else:
        headers = {
            "X-Gitlab-Event": event,
            "X-Gitlab-Token": project.webhook_secret,
            "Idempotency-Key": secrets.token_hex(8),
        }
    headers["Content-Type"] = content_type
    got_status, reply = await post_webhook(
        f"{control.http_url}/webhooks/{forge}/{project.id}", body, headers
    )
    assert (got_status, reply["result"]) == (status, result)
    if status == 400:
        assert reply["error"] == (
            "the JSON payload nests arrays or objects too deeply to be a forge's payload"
        )
    assert await build_ids(control, project.id) == []


# (case, the delivery headers both projects' hooks get)
SHARED_IDS: list[tuple[str, str, dict[str, str]]] = [
    # Older GitLab names the event, not the delivery: one id for each hook.
    ("gitlab: one X-Gitlab-Event-UUID for two hooks", "gitlab", {"X-Gitlab-Event-UUID": "event"}),
    # A tenant who learns another's delivery id neither blocks nor sees it.
    ("github: another project's delivery id", "github", {"X-GitHub-Delivery": "guid"}),
]


@pytest.mark.parametrize(("label", "forge", "headers"), SHARED_IDS, ids=[c[0] for c in SHARED_IDS])
async def test_a_delivery_id_is_each_projects_own(
    control: ControlHandle, api: Api, label: str, forge: str, headers: dict[str, str]
) -> None:
    first = await api.create_project("web", REPO)
    second = await api.create_project("api", REPO)
    make = github(GITHUB_BODY, **headers) if forge == "github" else gitlab(GITLAB_BODY, **headers)
    queued = {}
    for project in (first, second):
        status, reply = await send(control, project, make)
        assert (status, reply["result"]) == (202, "queued")
        queued[project.id] = reply["build_id"]
    for project in (second, first):
        status, reply = await send(control, project, make)
        assert (status, reply["result"], reply["build_id"]) == (
            200, "duplicate", queued[project.id],
        )  # fmt: skip
    for project in (first, second):
        assert await build_ids(control, project.id) == [queued[project.id]]
