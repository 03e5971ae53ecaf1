"""GitLab's commit statuses: ``POST /projects/:id/statuses/:sha``.

The documented request: ``PRIVATE-TOKEN: <token>``, ``state`` (pending,
running, success, failed or canceled), ``name`` (the context), ``ref``,
``target_url`` and ``description``; ``:id`` is the project's id or its
URL-encoded path. GitLab answers 201 with the status; 400 for a bad field,
401 for a bad token, 404 for a project the token cannot see. Its status
machine refuses a move to the state a status is already in ("Cannot
transition status via :run from :running"): that answer means the status
is already what we asked for.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import aiohttp

from control.forge.statuses import (
    ForgeRejected,
    ForgeState,
    ForgeTarget,
    StatusUpdate,
    post_json,
    shorten,
)

MAX_DESCRIPTION = 255
STATES = {
    ForgeState.PENDING: "pending",
    ForgeState.RUNNING: "running",
    ForgeState.SUCCESS: "success",
    ForgeState.FAILURE: "failed",
    # GitLab has no error state.
    ForgeState.ERROR: "failed",
    ForgeState.CANCELED: "canceled",
}
_SAME_STATE = re.compile(r"Cannot transition status via :\w+ from :(\w+)")


class GitLabStatuses:
    """``CommitStatuses`` for gitlab.com and self-managed GitLab
    (``api_url`` ends in ``/api/v4``). The caller owns ``session``."""

    forge = "gitlab"

    def __init__(self, session: aiohttp.ClientSession, timeout: float = 10.0) -> None:
        self.session = session
        self.timeout = timeout

    def forge_state(self, state: ForgeState) -> str:
        return STATES[state]

    async def post(self, target: ForgeTarget, update: StatusUpdate) -> None:
        """Raises ``ForgeUnavailable`` or ``ForgeRejected``."""
        state = STATES[update.state]
        body: dict[str, object] = {
            "state": state,
            "name": update.context,
            "description": shorten(update.description, MAX_DESCRIPTION),
        }
        if update.target_url:
            body["target_url"] = update.target_url
        if update.ref:
            body["ref"] = update.ref
        project = quote(target.repo, safe="")
        try:
            await post_json(
                self.session,
                f"{target.api_url.rstrip('/')}/projects/{project}/statuses/{update.sha}",
                {"PRIVATE-TOKEN": target.token, "User-Agent": "conveyor"},
                body,
                self.timeout,
            )
        except ForgeRejected as exc:
            same = _SAME_STATE.search(str(exc))
            if exc.status == 400 and same and same.group(1) == state:
                return
            raise
