"""GitLab webhooks: token check and payload parsing.

Follows GitLab's documented shapes: ``X-Gitlab-Token`` carries the secret as
is; ``X-Gitlab-Event`` is ``Push Hook``, ``Tag Push Hook`` or ``Merge Request
Hook``; ``X-Gitlab-Event-UUID`` identifies the delivery. A push's commit is
``checkout_sha`` (null on a branch deletion, when ``after`` is all zeros);
``commits`` lists the newest 20 and ``total_commits_count`` counts them all.
A merge request's head is ``object_attributes.last_commit.id`` and its
``oldrev`` is present only when an update brought new commits.
"""

from __future__ import annotations

import hmac

from control.webhooks.push import (
    ZERO_SHA,
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

BUILD_ACTIONS = frozenset({"open", "reopen", "update"})
CLOSE_ACTIONS = frozenset({"close", "merge"})


def verify(secret: str, header: str | None) -> bool:
    if not header or not secret:
        return False
    return hmac.compare_digest(secret.encode(), header.encode())


def repository(payload: dict[str, object]) -> ForgeRepo | None:
    """The project an event comes from: its numeric id. Its ``web_url`` is
    not read: the API base is the project's setting."""
    project = payload.get("project")
    if not isinstance(project, dict):
        return None
    project_id = project.get("id", payload.get("project_id"))
    if not _positive(project_id):
        return None
    return ForgeRepo("gitlab", str(project_id))


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_push(payload: object) -> PushEvent:
    """A ``Push Hook`` or ``Tag Push Hook``. Raises ``PayloadError`` naming
    the field that is missing or wrong."""
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object")
    ref = text_field(payload, "ref")
    after = text_field(payload, "after")
    checkout = payload.get("checkout_sha")
    sha = checkout if isinstance(checkout, str) and checkout else after
    if after == ZERO_SHA:
        sha = ZERO_SHA
    message = ""
    commits = payload.get("commits")
    if isinstance(commits, list):
        for commit in commits:
            if isinstance(commit, dict) and commit.get("id") == sha:
                msg = commit.get("message")
                message = msg if isinstance(msg, str) else ""
    files, listed = commit_files(commits)
    total = payload.get("total_commits_count")
    count = max(total if isinstance(total, int) else 0, listed)
    return PushEvent(
        ref=ref,
        commit_sha=sha,
        head_message=message,
        changed_files=files,
        commit_count=count,
        repo=repository(payload),
    )


def parse_merge_request(payload: object) -> PullRequestEvent:
    """A ``Merge Request Hook``: open, reopen and an update that brought new
    commits build the head commit; close and merge cancel; anything else
    (approvals, title edits...) is ignored. Raises ``PayloadError`` naming
    the field that is missing or wrong."""
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object")
    attrs = object_field(payload, "object_attributes")
    action = text_field(attrs, "action")
    last = object_field(attrs, "last_commit")
    kind = RequestAction.IGNORE
    reason = f"merge request action {action!r} does not build"
    if action in CLOSE_ACTIONS:
        kind = RequestAction.CLOSE
    elif action == "update" and not attrs.get("oldrev"):
        reason = "merge request updated without new commits"
    elif action in BUILD_ACTIONS:
        kind = RequestAction.BUILD
    return PullRequestEvent(
        number=int_field(attrs, "iid"),
        action=action,
        kind=kind,
        branch=text_field(attrs, "source_branch"),
        commit_sha=text_field(last, "id"),
        repo=repository(payload),
        ignore_reason=reason,
        # A request from another project (a fork), or one that does not
        # show it is not, runs without secrets unless the project opts in.
        from_fork=not (
            _positive(attrs.get("source_project_id"))
            and attrs.get("source_project_id") == attrs.get("target_project_id")
        ),
    )
