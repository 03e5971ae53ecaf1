"""Signed webhooks built from the documented sample payloads in
``payloads/``: each helper changes only the fields a case is about."""

from __future__ import annotations

import copy
import json
import secrets
from pathlib import Path
from typing import Any

from tests.helpers import github_headers, post_webhook

PAYLOADS = Path(__file__).resolve().parent / "payloads"
ZERO = "0" * 40


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PAYLOADS / f"{name}.json").read_text())
    return data


def _commits(
    template: dict[str, Any], sha: str, message: str, files: list[str], count: int
) -> list[dict[str, Any]]:
    """``count`` commits, the last one ``sha`` changing ``files``."""
    out = []
    for i in range(count):
        commit = copy.deepcopy(template)
        last = i == count - 1
        commit.update(
            id=sha if last else f"{i + 1:040x}",
            message=message if last else f"commit {i + 1}",
            added=[],
            removed=[],
            modified=files if last else [],
        )
        out.append(commit)
    return out


def github_push(
    branch: str,
    sha: str,
    *,
    message: str = "Update README.md",
    files: list[str] | None = None,
    commits: int = 1,
    repo: str = "acme/web",
) -> bytes:
    payload = load("github/push")
    files = ["README.md"] if files is None else files
    payload["ref"] = f"refs/heads/{branch}"
    payload["after"] = sha
    payload["repository"]["full_name"] = repo
    payload["repository"]["html_url"] = f"https://github.com/{repo}"
    template = payload["commits"][0]
    payload["commits"] = _commits(template, sha, message, files, commits) if commits else []
    payload["head_commit"] = {**copy.deepcopy(template), "id": sha, "message": message}
    return json.dumps(payload).encode()


def github_tag(tag: str, sha: str) -> bytes:
    payload = load("github/push_tag")
    payload.update(ref=f"refs/tags/{tag}", after=sha)
    return json.dumps(payload).encode()


def github_delete(branch: str) -> bytes:
    payload = load("github/push_delete")
    payload["ref"] = f"refs/heads/{branch}"
    return json.dumps(payload).encode()


def github_pull_request(action: str, number: int, branch: str, sha: str) -> bytes:
    payload = load("github/pull_request")
    payload["action"] = action
    payload["number"] = number
    pull = payload["pull_request"]
    pull["number"] = number
    pull["head"].update(ref=branch, sha=sha, label=f"acme:{branch}")
    if action == "closed":
        pull.update(state="closed", closed_at="2019-05-15T15:30:00Z")
    return json.dumps(payload).encode()


def gitlab_push(
    branch: str,
    sha: str,
    *,
    message: str = "fixed readme",
    files: list[str] | None = None,
    commits: int = 1,
    total: int | None = None,
) -> bytes:
    payload = load("gitlab/push")
    files = ["README.md"] if files is None else files
    template = payload["commits"][-1]
    payload.update(ref=f"refs/heads/{branch}", after=sha, checkout_sha=sha)
    payload["commits"] = _commits(template, sha, message, files, min(commits, 20))
    payload["total_commits_count"] = commits if total is None else total
    return json.dumps(payload).encode()


def gitlab_tag(tag: str, sha: str) -> bytes:
    payload = load("gitlab/tag_push")
    payload.update(ref=f"refs/tags/{tag}", after=sha, checkout_sha=sha)
    return json.dumps(payload).encode()


def gitlab_delete(branch: str) -> bytes:
    payload = load("gitlab/push_delete")
    payload["ref"] = f"refs/heads/{branch}"
    return json.dumps(payload).encode()


def gitlab_merge_request(
    action: str, iid: int, branch: str, sha: str, *, oldrev: str | None = None
) -> bytes:
    payload = load("gitlab/merge_request")
    attrs = payload["object_attributes"]
    attrs.update(action=action, iid=iid, source_branch=branch)
    attrs["last_commit"]["id"] = sha
    if oldrev is not None:
        attrs["oldrev"] = oldrev
    if action in ("close", "merge"):
        attrs["state"] = "closed" if action == "close" else "merged"
    return json.dumps(payload).encode()


async def send_github(
    http_url: str,
    project: Any,
    body: bytes,
    event: str = "push",
    delivery: str = "",
) -> tuple[int, dict[str, Any]]:
    """POST a signed GitHub delivery to the project's webhook."""
    return await post_webhook(
        f"{http_url}/webhooks/github/{project.id}",
        body,
        github_headers(project.webhook_secret, body, event=event, delivery=delivery),
    )


async def send_gitlab(
    http_url: str,
    project: Any,
    body: bytes,
    event: str = "Push Hook",
    delivery: str = "",
) -> tuple[int, dict[str, Any]]:
    """POST a GitLab delivery with the project's token."""
    return await post_webhook(
        f"{http_url}/webhooks/gitlab/{project.id}",
        body,
        {
            "X-Gitlab-Event": event,
            "X-Gitlab-Token": project.webhook_secret,
            "X-Gitlab-Event-UUID": delivery or secrets.token_hex(8),
            "Content-Type": "application/json",
        },
    )
