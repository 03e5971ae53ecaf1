"""What a forge event means to Conveyor, whichever forge sent it."""

from __future__ import annotations

import enum
import json
import urllib.parse
from dataclasses import dataclass

ZERO_SHA = "0" * 40
# GitHub's webhook form offers this content type besides application/json:
# the JSON document is then the form field ``payload``.
FORM = "application/x-www-form-urlencoded"
# Bounds on what a payload may make us hold (GitHub lists at most 2,048
# commits and 3,000 files per commit; GitLab 20 commits).
MAX_COMMITS = 2048
MAX_FILES = 100_000


@dataclass(frozen=True)
class ForgeRepo:
    """Which repository a payload says it comes from: ``forge`` is "github"
    or "gitlab", ``repo`` "owner/name" or a GitLab project id. Never where
    the forge's API lives: a payload must not choose where the forge token
    is sent."""

    forge: str
    repo: str


@dataclass(frozen=True)
class PushEvent:
    """A push. ``changed_files`` are the paths added, modified or removed by
    the commits the payload lists; ``commit_count`` is how many commits the
    push holds (GitLab lists only the newest 20 but counts them all)."""

    ref: str
    commit_sha: str
    head_message: str = ""
    changed_files: tuple[str, ...] = ()
    commit_count: int = 0
    repo: ForgeRepo | None = None

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def is_tag(self) -> bool:
        return self.ref.startswith("refs/tags/")

    @property
    def tag(self) -> str | None:
        return self.ref.removeprefix("refs/tags/") if self.is_tag else None

    @property
    def deletes_branch(self) -> bool:
        """The push deletes its ref (a branch or a tag): ``after`` is all zeros."""
        return self.commit_sha == ZERO_SHA


class RequestAction(enum.StrEnum):
    """What a pull/merge request event asks of us."""

    BUILD = "build"
    CLOSE = "close"
    IGNORE = "ignore"


@dataclass(frozen=True)
class PullRequestEvent:
    """A GitHub pull request or GitLab merge request event. ``number`` is
    the request's number (GitLab: ``iid``); ``branch`` and ``commit_sha``
    its head; ``action`` the forge's own word for what happened."""

    number: int
    action: str
    kind: RequestAction
    branch: str
    commit_sha: str
    repo: ForgeRepo | None = None
    ignore_reason: str = ""
    # The head is in another repository (a fork), or the payload does not
    # show it is not: such builds run without secrets unless the project
    # opts in.
    from_fork: bool = True


class PayloadError(ValueError):
    """The body is not a payload of the documented shape; the message names
    the field."""


def decode_payload(body: bytes, content_type: str) -> object:
    """The JSON document a delivery carries: the body itself, or its form
    field ``payload`` when ``content_type`` is ``FORM`` (what GitHub sends
    when a webhook's content type is ``application/x-www-form-urlencoded``).
    Check the signature over the raw body before calling this.

    Raises ``PayloadError`` with a sentence when the body is not JSON, nests
    arrays or objects too deeply for the parser, or is a form without
    exactly one ``payload`` field.
    """
    if content_type.split(";", 1)[0].strip().lower() == FORM:
        try:
            fields = urllib.parse.parse_qs(
                body.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=True,
                errors="strict",
                max_num_fields=32,
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise PayloadError(f"the body is not a valid {FORM} form") from exc
        values = fields.get("payload", [])
        if len(values) != 1:
            raise PayloadError(
                f"a {FORM} body must carry the JSON payload in one form field 'payload'"
            )
        document: str | bytes = values[0]
    else:
        document = body
    try:
        return json.loads(document)
    except RecursionError as exc:
        # The parser recurses once per level: a signed body of 1,000 nested
        # arrays must be a refusal, not a server error.
        raise PayloadError(
            "the JSON payload nests arrays or objects too deeply to be a forge's payload"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PayloadError("the body is not valid JSON") from exc


def text_field(payload: dict[str, object], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise PayloadError(f"field {name!r} must be a non-empty string")
    return value


def object_field(payload: dict[str, object], name: str) -> dict[str, object]:
    value = payload.get(name)
    if not isinstance(value, dict):
        raise PayloadError(f"field {name!r} must be an object")
    return value


def int_field(payload: dict[str, object], name: str) -> int:
    value = payload.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
        raise PayloadError(f"field {name!r} must be a positive integer")
    return value


def commit_files(commits: object) -> tuple[tuple[str, ...], int]:
    """The distinct paths the ``commits`` list touches, and how many commits
    it holds. Both forges give each commit ``added``, ``modified`` and
    ``removed`` lists of paths."""
    if not isinstance(commits, list):
        return (), 0
    files: dict[str, None] = {}
    for commit in commits[:MAX_COMMITS]:
        if not isinstance(commit, dict):
            raise PayloadError("each entry of 'commits' must be an object")
        for key in ("added", "modified", "removed"):
            paths = commit.get(key)
            if isinstance(paths, list):
                for path in paths:
                    if isinstance(path, str) and path and len(files) < MAX_FILES:
                        files[path] = None
    return tuple(files), len(commits)
