"""GitHub webhooks: signature check and push payload parsing.

Follows GitHub's documented shapes: ``X-Hub-Signature-256: sha256=<hex>`` is
the HMAC-SHA256 of the raw body with the webhook secret; ``X-GitHub-Event``
names the event; ``X-GitHub-Delivery`` is unique per delivery.
"""

from __future__ import annotations

import hashlib
import hmac

from control.webhooks.push import PayloadError, PushEvent, text_field


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Constant-time check of ``X-Hub-Signature-256``."""
    if not header or not secret:
        return False
    return hmac.compare_digest(signature(secret, body).encode(), header.strip().encode())


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
    return PushEvent(ref=ref, commit_sha=after, head_message=message)
