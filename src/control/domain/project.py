"""Projects and the validation of their settings. Pure: no I/O."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from datetime import datetime
from urllib.parse import urlparse

from control.domain.cache import validate_cache_lockfiles, validate_cache_paths
from control.errors import InvalidArgument

# Matched with ``fullmatch``: ``$`` alone also matches before a final "\n".
NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# git check-ref-format, simplified to what a branch name may hold here.
BRANCH_RE = re.compile(r"^(?![/-])(?!.*//)(?!.*\.\.)(?!.*@\{)[A-Za-z0-9._/\-+]{1,255}(?<![/.])$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
MAX_COMMAND_BYTES = 16 * 1024
DEFAULT_RUN_TIMEOUT_SECONDS = 20 * 60
ALLOWED_SCHEMES = ("https", "http", "ssh", "git", "file")
FORGES = ("github", "gitlab")
# Where commit statuses go when a project names no API base. Any other base
# must be in the operator's allow-list: the forge token is sent there.
DEFAULT_FORGE_API = {"github": "https://api.github.com", "gitlab": "https://gitlab.com/api/v4"}
MAX_GLOBS = 50
MAX_GLOB_CHARS = 256
GITHUB_REPO_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")
# A numeric project id, or a "group/subgroup/project" path.
GITLAB_REPO_RE = re.compile(
    r"^(?:[0-9]{1,18}|[A-Za-z0-9_.][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_.][A-Za-z0-9_.-]*)+)$"
)


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
    branch_include: tuple[str, ...] = ()
    branch_exclude: tuple[str, ...] = ()
    watch_include: tuple[str, ...] = ()
    watch_exclude: tuple[str, ...] = ()
    forge: str = ""
    forge_api_url: str = ""
    forge_repo: str = ""
    network_isolated: bool = False
    # The stored cache lists (empty: the defaults of ``control.domain.cache``)
    # and the cache generation, which only a purge changes.
    cache_disabled: bool = False
    cache_lockfiles: tuple[str, ...] = ()
    cache_paths: tuple[str, ...] = ()
    cache_generation: int = 1
    # Builds of pull requests from another repository get secrets and the
    # preview step only with this set (see ``without_fork_privileges``).
    fork_secrets: bool = False


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
    # Globs (see ``glob_regex``): branch lists apply to branches other than
    # the production branch; watch lists to the files a push changed.
    branch_include: tuple[str, ...] = ()
    branch_exclude: tuple[str, ...] = ()
    watch_include: tuple[str, ...] = ()
    watch_exclude: tuple[str, ...] = ()
    forge: str = ""
    forge_api_url: str = ""
    forge_repo: str = ""
    network_isolated: bool = False
    # Build cache: empty lists mean the defaults (see ``control.domain.cache``).
    cache_disabled: bool = False
    cache_lockfiles: tuple[str, ...] = ()
    cache_paths: tuple[str, ...] = ()
    fork_secrets: bool = False

    def validate(
        self, max_run_timeout_seconds: int, forge_api_urls: frozenset[str] = frozenset()
    ) -> None:
        """Raise ``InvalidArgument`` naming the first wrong field.
        ``forge_api_urls`` is the operator's allow-list of forge API bases
        besides the public ones (``DEFAULT_FORGE_API``)."""
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
        for field_name in ("branch_include", "branch_exclude", "watch_include", "watch_exclude"):
            validate_globs(field_name, getattr(self, field_name))
        validate_forge(self.forge, self.forge_api_url, self.forge_repo)
        validate_forge_api_allowed(self.forge, self.forge_api_url, forge_api_urls)
        validate_cache_lockfiles(self.cache_lockfiles)
        validate_cache_paths(self.cache_paths)


def validate_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
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
    if re.fullmatch(r"[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/].*", url):
        return
    parsed = urlparse(url)
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise InvalidArgument(
            "repo_url",
            f"scheme must be one of {', '.join(ALLOWED_SCHEMES)} (or an absolute path)",
        )
    if parsed.scheme != "file" and not parsed.netloc:
        raise InvalidArgument("repo_url", "must name a host")
    if parsed.scheme == "file":
        # The runner binds the path after "file://" as written: no host, no
        # escapes, nothing git would read differently.
        if parsed.netloc or not parsed.path.startswith("/"):
            raise InvalidArgument("repo_url", "file URLs must be file:///absolute/path")
        if any(ch in url for ch in "%?#"):
            raise InvalidArgument("repo_url", "file URLs must not hold '%', '?' or '#'")


def local_repository_path(url: str) -> str | None:
    """The host path a local repository names (an absolute path or a
    ``file://`` URL), or None for a network URL. ``url`` must have passed
    ``validate_repo_url``."""
    if url.startswith("/"):
        return url
    if url.startswith("file://"):
        return url.removeprefix("file://")
    return None


def validate_repo_allowed(url: str, local_allowed: bool) -> None:
    """Raise ``InvalidArgument("repo_url", ...)`` for a local path or
    ``file://`` URL when the operator does not allow local repositories
    (``CONVEYOR_LOCAL_REPOSITORIES=deny``): with several accounts on one
    control plane, a path would let a tenant name another tenant's
    repository."""
    if not local_allowed and local_repository_path(url) is not None:
        raise InvalidArgument(
            "repo_url",
            "local repository paths are not allowed on this control plane"
            " (CONVEYOR_LOCAL_REPOSITORIES=deny): serve the repository over https, ssh or git",
        )


def validate_branch(field_name: str, branch: str) -> None:
    if not BRANCH_RE.fullmatch(branch) or branch.endswith(".lock"):
        raise InvalidArgument(field_name, f"{branch!r} is not a valid branch name")


def validate_commit_sha(field_name: str, sha: str) -> None:
    if not SHA_RE.fullmatch(sha):
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


def validate_globs(field_name: str, patterns: tuple[str, ...]) -> None:
    """Raise ``InvalidArgument`` unless every pattern is a usable glob."""
    if len(patterns) > MAX_GLOBS:
        raise InvalidArgument(field_name, f"holds at most {MAX_GLOBS} patterns")
    for pattern in patterns:
        if not pattern or len(pattern) > MAX_GLOB_CHARS:
            raise InvalidArgument(field_name, f"each pattern must be 1-{MAX_GLOB_CHARS} characters")
        if any(ch in pattern for ch in "\n\r\t\0"):
            raise InvalidArgument(field_name, f"{pattern!r} holds a control character")
        if pattern.startswith("/"):
            raise InvalidArgument(
                field_name, f"{pattern!r}: patterns are relative to the repository root"
            )
        try:
            glob_regex(pattern)
        except ValueError as exc:
            raise InvalidArgument(field_name, f"{pattern!r}: {exc}") from None


def validate_forge(forge: str, api_url: str, repo: str) -> None:
    """Raise ``InvalidArgument`` naming the wrong forge setting."""
    if forge and forge not in FORGES:
        raise InvalidArgument("forge", f"must be one of {', '.join(FORGES)} (or empty)")
    if (api_url or repo) and not forge:
        raise InvalidArgument("forge", "name the forge (github or gitlab) of forge_repo")
    if api_url:
        parsed = urlparse(api_url)
        if (
            parsed.scheme not in ("https", "http")
            or not parsed.netloc
            or len(api_url) > 2048
            or any(ch.isspace() for ch in api_url)
        ):
            raise InvalidArgument(
                "forge_api_url", "must be an http(s) URL such as https://api.github.com"
            )
    if repo:
        pattern = GITHUB_REPO_RE if forge == "github" else GITLAB_REPO_RE
        if not pattern.fullmatch(repo) or len(repo) > 255:
            example = "owner/repo" if forge == "github" else "a project id or group/project"
            raise InvalidArgument("forge_repo", f"{repo!r} is not {example}")


def normalize_api_url(url: str) -> str:
    """An API base as the allow-list compares it: without a trailing '/'."""
    return url.strip().rstrip("/")


def forge_api_allowed(forge: str, api_url: str, allowed: frozenset[str]) -> bool:
    """Whether the forge token may be sent to ``api_url`` ("" means the
    forge's public API): the forge's public API or a base in ``allowed``."""
    base = normalize_api_url(api_url) or DEFAULT_FORGE_API.get(forge, "")
    if not base:
        return False
    return base == DEFAULT_FORGE_API.get(forge) or base in {normalize_api_url(u) for u in allowed}


def validate_forge_api_allowed(forge: str, api_url: str, allowed: frozenset[str]) -> None:
    """Raise ``InvalidArgument`` unless ``forge_api_url`` is empty, the
    forge's public API, or in the operator's allow-list."""
    if api_url and forge and not forge_api_allowed(forge, api_url, allowed):
        raise InvalidArgument(
            "forge_api_url",
            f"{api_url!r} is not {DEFAULT_FORGE_API[forge]} nor in the operator's"
            " allow-list of forge API bases (CONVEYOR_FORGE_API_URLS)",
        )


def without_fork_privileges(project: Project) -> Project:
    """The project as a build of a fork's pull request sees it when the
    project did not opt in (``fork_secrets``): no deploy or preview step,
    since those run with deploy credentials. The caller also withholds the
    secrets."""
    if project.fork_secrets:
        return project
    return replace(project, deploy_command="", preview_command="")


@functools.lru_cache(maxsize=1024)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a branch or path glob; match it with ``fullmatch``.

    ``*`` matches within one path segment, ``**`` across segments (``**/``
    also matches no directory at all), ``?`` one character other than
    ``/``, ``[abc]``, ``[a-z]`` and ``[!abc]`` one character of a class; a
    trailing ``/`` means everything below that directory. Everything else is
    literal. Raises ``ValueError`` for an unclosed ``[``.
    """
    if pattern.endswith("/"):
        pattern += "**"
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if pattern.startswith("**", i):
            at_segment_start = i == 0 or pattern[i - 1] == "/"
            i += 2
            if i < n and pattern[i] == "/" and at_segment_start:
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern.startswith("[!", i) else i + 1)
            body = pattern[i + 1 : end] if end != -1 else ""
            negate = body.startswith("!")
            body = body.removeprefix("!")
            if end == -1 or not body:
                raise ValueError("a '[' class is not closed")
            # Escape every member but '-' so the class means what it says.
            members = "".join(c if c == "-" else re.escape(c) for c in body)
            out.append(f"[{'^' if negate else ''}{members}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def matches_any(patterns: tuple[str, ...], value: str) -> str | None:
    """The first of ``patterns`` that matches all of ``value``, or None."""
    for pattern in patterns:
        if glob_regex(pattern).fullmatch(value):
            return pattern
    return None
