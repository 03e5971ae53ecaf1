"""Projects and the validation of their settings. Pure: no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlparse

from control.errors import InvalidArgument

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# git check-ref-format, simplified to what a branch name may hold here.
BRANCH_RE = re.compile(r"^(?![/-])(?!.*//)(?!.*\.\.)(?!.*@\{)[A-Za-z0-9._/\-+]{1,255}(?<![/.])$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
MAX_COMMAND_BYTES = 16 * 1024
DEFAULT_RUN_TIMEOUT_SECONDS = 20 * 60
ALLOWED_SCHEMES = ("https", "http", "ssh", "git", "file")


@dataclass(frozen=True)
class Project:
    id: str
    account_id: str
    name: str
    repo_url: str
    production_branch: str
    build_command: str
    deploy_command: str
    preview_command: str
    webhook_secret: str
    run_timeout_seconds: int
    cancel_in_progress: bool
    build_other_branches: bool
    root_directory: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ProjectSettings:
    """The user-settable part of a project, validated by ``validate``."""

    name: str
    repo_url: str
    production_branch: str = "main"
    build_command: str = ""
    deploy_command: str = ""
    preview_command: str = ""
    run_timeout_seconds: int = DEFAULT_RUN_TIMEOUT_SECONDS
    cancel_in_progress: bool = False
    build_other_branches: bool = True
    root_directory: str = ""

    def validate(self, max_run_timeout_seconds: int) -> None:
        """Raise ``InvalidArgument`` naming the first wrong field."""
        validate_name(self.name)
        validate_repo_url(self.repo_url)
        validate_branch("production_branch", self.production_branch)
        for field_name in ("build_command", "deploy_command", "preview_command"):
            validate_command(field_name, getattr(self, field_name))
        if not self.build_command.strip() and not self.deploy_command.strip():
            raise InvalidArgument("build_command", "a project needs a build or a deploy command")
        if not 1 <= self.run_timeout_seconds <= max_run_timeout_seconds:
            raise InvalidArgument(
                "run_timeout_seconds",
                f"must be between 1 and {max_run_timeout_seconds} seconds",
            )
        validate_root_directory(self.root_directory)


def validate_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            "name",
            "must be 1-63 lower-case letters, digits or '-', starting and ending "
            "with a letter or digit",
        )


def validate_repo_url(url: str) -> None:
    """Accept https/http/ssh/git/file URLs, scp-style ``user@host:path`` and
    absolute local paths."""
    if not url or len(url) > 2048:
        raise InvalidArgument("repo_url", "must be 1-2048 characters")
    if any(ch in url for ch in "\n\r\t\0 ") or url.startswith("-"):
        raise InvalidArgument("repo_url", "must not contain whitespace or start with '-'")
    if url.startswith("/"):
        return
    if re.match(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/].*$", url):
        return
    parsed = urlparse(url)
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise InvalidArgument(
            "repo_url",
            f"scheme must be one of {', '.join(ALLOWED_SCHEMES)} (or an absolute path)",
        )
    if parsed.scheme != "file" and not parsed.netloc:
        raise InvalidArgument("repo_url", "must name a host")
    if parsed.scheme == "file" and not parsed.path.startswith("/"):
        raise InvalidArgument("repo_url", "file URLs must hold an absolute path")


def validate_branch(field_name: str, branch: str) -> None:
    if not BRANCH_RE.match(branch) or branch.endswith(".lock"):
        raise InvalidArgument(field_name, f"{branch!r} is not a valid branch name")


def validate_commit_sha(field_name: str, sha: str) -> None:
    if not SHA_RE.match(sha):
        raise InvalidArgument(field_name, "must be a full 40-character lower-case hex commit id")


def validate_command(field_name: str, command: str) -> None:
    if len(command.encode()) > MAX_COMMAND_BYTES:
        raise InvalidArgument(field_name, f"must be at most {MAX_COMMAND_BYTES} bytes")
    if "\0" in command:
        raise InvalidArgument(field_name, "must not contain NUL bytes")


def validate_root_directory(path: str) -> None:
    if path == "":
        return
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or len(path) > 512:
        raise InvalidArgument(
            "root_directory", "must be a relative path inside the repository, without '..'"
        )
