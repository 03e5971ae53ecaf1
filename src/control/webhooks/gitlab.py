"""GitLab webhooks: token check and push payload parsing.

Follows GitLab's documented shapes: ``X-Gitlab-Token`` carries the secret as
is; ``X-Gitlab-Event: Push Hook``; the commit is ``checkout_sha`` (null on a
branch deletion, when ``after`` is all zeros).
"""

from __future__ import annotations

import hmac

from control.webhooks.push import ZERO_SHA, PayloadError, PushEvent, text_field


def verify(secret: str, header: str | None) -> bool:
    if not header or not secret:
        return False
    return hmac.compare_digest(secret.encode(), header.encode())


def parse_push(payload: object) -> PushEvent:
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
    return PushEvent(ref=ref, commit_sha=sha, head_message=message)
