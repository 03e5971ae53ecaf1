"""GitHub webhooks: signature check and payload parsing.

Follows GitHub's documented shapes: ``X-Hub-Signature-256: sha256=<hex>`` is
the HMAC-SHA256 of the raw body with the webhook secret; ``X-GitHub-Event``
names the event (``push``, ``ping``, ``pull_request``...);
``X-GitHub-Delivery`` is unique per delivery. A tag push and a branch
deletion are ``push`` events too (``refs/tags/...``; ``after`` all zeros).
"""

from __future__ import annotations

import hashlib
import hmac

from control.webhooks.push import (
    ForgeRepo,
    PayloadError,
    PullRequestEvent,
    PushEvent,
    RequestAction,
    commit_files,
    int_field,
    object_field,
    text_field,
)

BUILD_ACTIONS = frozenset({"opened", "synchronize", "reopened"})


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Constant-time check of ``X-Hub-Signature-256``."""
    if not header or not secret:
        return False
    return hmac.compare_digest(signature(secret, body).encode(), header.strip().encode())


def repository(payload: dict[str, object]) -> ForgeRepo | None:
    """The repository an event comes from: ``repository.full_name``. Its
    ``html_url`` is not read: the API base is the project's setting."""
    repo = payload.get("repository")
    if not isinstance(repo, dict) or not isinstance(repo.get("full_name"), str):
        return None
    return ForgeRepo("github", repo["full_name"])


def _from_fork(payload: dict[str, object], pull: dict[str, object]) -> bool:
    """Whether the request's head lives outside the repository it targets:
    ``head.repo.fork``, a ``head.repo.full_name`` other than the base's, or
    no head repository at all (a deleted fork)."""
    head = pull.get("head")
    base = pull.get("base")
    head_repo = head.get("repo") if isinstance(head, dict) else None
    base_repo = base.get("repo") if isinstance(base, dict) else payload.get("repository")
    if not isinstance(head_repo, dict) or not isinstance(base_repo, dict):
        return True
    head_name = head_repo.get("full_name")
    return (
        head_repo.get("fork") is not False
        or not isinstance(head_name, str)
        or head_name != base_repo.get("full_name")
    )


def parse_push(payload: object) -> PushEvent:
    """Raises ``PayloadError`` naming the field that is missing or wrong."""
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object")
    ref = text_field(payload, "ref")
    after = text_field(payload, "after")
    message = ""
    head = payload.get("head_commit")
    if isinstance(head, dict) and isinstance(head.get("message"), str):
        message = head["message"]
    files, count = commit_files(payload.get("commits"))
    return PushEvent(
        ref=ref,
        commit_sha=after,
        head_message=message,
        changed_files=files,
        commit_count=count,
        repo=repository(payload),
    )


def parse_pull_request(payload: object) -> PullRequestEvent:
    """A ``pull_request`` event: opened, synchronize and reopened build the
    head commit; closed (merged or not) cancels; other actions are ignored.
    Raises ``PayloadError`` naming the field that is missing or wrong."""
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object")
    action = text_field(payload, "action")
    pull = object_field(payload, "pull_request")
    head = object_field(pull, "head")
    number = int_field(payload, "number")
    if action in BUILD_ACTIONS:
        kind = RequestAction.BUILD
    elif action == "closed":
        kind = RequestAction.CLOSE
    else:
        kind = RequestAction.IGNORE
    return PullRequestEvent(
        number=number,
        action=action,
        kind=kind,
        branch=text_field(head, "ref"),
        commit_sha=text_field(head, "sha"),
        repo=repository(payload),
        ignore_reason=f"pull request action {action!r} does not build",
        from_fork=_from_fork(payload, pull),
    )
