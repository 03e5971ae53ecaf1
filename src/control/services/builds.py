"""Builds as a caller sees them: list, show, trigger, retry, cancel, logs.

Every method takes the authenticated ``Principal``, checks its scope, and
answers only with the caller's account's builds: another account's build is
``NotFound``, exactly like a missing one.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from control.builds.lifecycle import Lifecycle
from control.domain import project as proj
from control.domain.build import Build, BuildStatus
from control.errors import FailedPrecondition, InvalidArgument
from control.forge.remote import RemoteReader
from control.logs.fanout import LogHub
from control.services.access import require
from control.storage.accounts import Principal
from control.storage.builds import BuildStore, is_uuid
from control.storage.logs import LogStore, StoredLine
from control.storage.projects import ProjectStore
from control.storage.pushes import PushLog, SkippedPush

log = logging.getLogger(__name__)

MAX_PAGE = 500
DEFAULT_PAGE = 50
# Lines per read of a stored log: one page of a JSON answer at most.
MAX_LOG_LINES = 10_000
TRIGGERS = frozenset({"push", "pull_request", "manual", "retry", "hook"})


@dataclass(frozen=True)
class BuildPage:
    """One page of builds, newest first; ``next_page_token`` is "" on the
    last page."""

    builds: list[Build]
    next_page_token: str


@dataclass(frozen=True)
class BuildFilter:
    """Exact-match filters of a build list; "" matches everything."""

    branch: str = ""
    status: str = ""
    trigger: str = ""

    def validate(self) -> None:
        """Raise ``InvalidArgument`` naming the filter that cannot match."""
        if self.branch:
            proj.validate_branch("branch", self.branch)
        if self.status and self.status not in {s.value for s in BuildStatus}:
            known = ", ".join(s.value for s in BuildStatus)
            raise InvalidArgument("status", f"must be one of {known}")
        if self.trigger and self.trigger not in TRIGGERS:
            raise InvalidArgument("trigger", f"must be one of {', '.join(sorted(TRIGGERS))}")


def encode_page_token(build: Build) -> str:
    """The opaque token of the page after ``build``."""
    raw = json.dumps([build.created_at.isoformat(), build.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, str] | None:
    """The (created_at, id) key a page token stands for; "" means the first
    page. Raises ``InvalidArgument("page_token", ...)`` for anything this
    server did not issue."""
    if not token:
        return None
    bad = InvalidArgument("page_token", "is not a page token this server issued")
    if len(token) > 200:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, build_id = json.loads(raw)
        key = (datetime.fromisoformat(created), build_id)
    except (binascii.Error, ValueError, TypeError, UnicodeError):
        raise bad from None
    if not isinstance(build_id, str) or not is_uuid(build_id) or key[0].tzinfo is None:
        raise bad
    return key


class BuildService:
    """What a caller may do with builds. Raises ``NotFound`` for a build or
    project that is missing or another account's, ``PermissionDenied`` for a
    missing scope, ``InvalidArgument`` naming the bad field, and
    ``FailedPrecondition`` naming the state that forbids the action."""

    def __init__(
        self,
        builds: BuildStore,
        projects: ProjectStore,
        lifecycle: Lifecycle,
        logs: LogStore,
        hub: LogHub,
        pushes: PushLog,
        *,
        reader: RemoteReader,
    ) -> None:
        self.reader = reader
        self.builds = builds
        self.projects = projects
        self.lifecycle = lifecycle
        self.logs = logs
        self.hub = hub
        self.pushes = pushes

    async def list(
        self,
        caller: Principal,
        project: str | None,
        *,
        filters: BuildFilter = BuildFilter(),
        limit: int = 0,
        page_token: str = "",
    ) -> BuildPage:
        """The caller's builds, newest first, of one project (id or name) or
        all; ``limit`` 0 means ``DEFAULT_PAGE``, at most ``MAX_PAGE``."""
        account = require(caller, "read")
        if limit < 0 or limit > MAX_PAGE:
            raise InvalidArgument("limit", f"must be between 0 and {MAX_PAGE}")
        filters.validate()
        before = decode_page_token(page_token)
        project_id = (await self.projects.get(account, project)).id if project else None
        size = limit or DEFAULT_PAGE
        # One more than the page tells whether a next page exists.
        found = await self.builds.list_page(
            account,
            project_id,
            branch=filters.branch,
            status=filters.status,
            trigger=filters.trigger,
            before=before,
            limit=size + 1,
        )
        page = found[:size]
        more = len(found) > size
        return BuildPage(page, encode_page_token(page[-1]) if more else "")

    async def get(self, caller: Principal, build_id: str) -> Build:
        """One build of the caller's account, with its steps."""
        return await self.builds.get(require(caller, "read"), build_id)

    async def trigger(
        self, caller: Principal, project: str, branch: str = "", commit_sha: str = ""
    ) -> Build:
        """Queue a manual build of ``branch`` (default: the production branch)
        at ``commit_sha`` (default: the branch head in the repository, read
        by ``RemoteReader.branch_head``, whose ``InvalidArgument`` and
        ``Unavailable`` this raises)."""
        account = require(caller, "write")
        found = await self.projects.get(account, project)
        branch = branch or found.production_branch
        proj.validate_branch("branch", branch)
        if commit_sha:
            proj.validate_commit_sha("commit_sha", commit_sha)
            sha = commit_sha
        else:
            # Fenced: unprivileged, bounded, the URL policy (control.forge.remote).
            sha = await self.reader.branch_head(account, found.repo_url, branch)
        build_id = await self.lifecycle.queue(
            found, branch=branch, commit_sha=sha, trigger="manual"
        )
        log.info("manual build by %s", caller.name, extra={"build_id": build_id})
        return await self.builds.get(account, build_id)

    async def retry(self, caller: Principal, build_id: str) -> Build:
        """Queue a new build of a finished build's branch and commit."""
        account = require(caller, "write")
        old = await self.builds.get(account, build_id)
        if not old.status.final:
            raise FailedPrecondition(
                f"build is {old.status.value}; only a finished build can be retried"
            )
        project = await self.projects.get(account, old.project_id)
        async with self.pushes.db.connection() as conn:
            fork = await self.pushes.is_fork_build(conn, old.id)
        if fork:
            # The retry is the fork's too: no secrets, no deploy, as the
            # original got.
            project = proj.without_fork_privileges(project)
        new_id = await self.lifecycle.queue(
            project,
            branch=old.branch,
            commit_sha=old.commit_sha,
            trigger="retry",
            production=old.production,
            retry_of=old.id,
        )
        log.info("retry of %s by %s", old.id, caller.name, extra={"build_id": new_id})
        return await self.builds.get(account, new_id)

    async def cancel(self, caller: Principal, build_id: str) -> Build:
        """Cancel a build that is not final yet."""
        account = require(caller, "write")
        return await self.lifecycle.cancel(account, build_id, by=caller.name)

    async def log_lines(
        self, caller: Principal, build_id: str, after: int, limit: int = MAX_LOG_LINES
    ) -> builtins.list[StoredLine]:
        """Up to ``limit`` stored lines numbered after ``after``, in order."""
        if limit < 1 or limit > MAX_LOG_LINES:
            raise InvalidArgument("limit", f"must be between 1 and {MAX_LOG_LINES}")
        build = await self.get(caller, build_id)
        lines = await self.logs.read(build.id, after, limit)
        return lines[:limit]

    async def log_tail(
        self, caller: Principal, build_id: str, count: int
    ) -> builtins.list[StoredLine]:
        """The last ``count`` stored lines (all of them when fewer)."""
        if count < 1 or count > MAX_LOG_LINES:
            raise InvalidArgument("tail", f"must be between 1 and {MAX_LOG_LINES}")
        build = await self.get(caller, build_id)
        last = await self.logs.last_line(build.id)
        return (await self.logs.read(build.id, max(0, last - count), count))[-count:]

    async def follow(
        self, caller: Principal, build_id: str, after: int
    ) -> AsyncIterator[tuple[builtins.list[StoredLine], BuildStatus | None]]:
        """Stored lines after ``after``, then live ones, from the in-memory
        fan-out every follower shares: yields (lines, None) until the build
        is final and every line was sent, then ([], final status)."""
        build = await self.get(caller, build_id)
        async for item in self.hub.follow(build.id, after, self._status):
            yield item

    async def _status(self, build_id: str) -> BuildStatus:
        return (await self.builds.get(None, build_id)).status

    async def skipped(
        self, caller: Principal, project: str | None, limit: int
    ) -> builtins.list[SkippedPush]:
        """The newest pushes that queued no build, each with its reason."""
        account = require(caller, "read")
        if limit < 0 or limit > MAX_PAGE:
            raise InvalidArgument("limit", f"must be between 0 and {MAX_PAGE}")
        project_id = (await self.projects.get(account, project)).id if project else None
        return await self.pushes.skipped(account, project_id, limit or DEFAULT_PAGE)
