"""GitHub's commit statuses: ``POST /repos/{owner}/{repo}/statuses/{sha}``.

The documented request: ``Authorization: Bearer <token>``, ``Accept:
application/vnd.github+json``, a JSON body with ``state`` (error, failure,
pending or success), ``target_url``, ``description`` (at most 140
characters) and ``context``. GitHub answers 201 with the status; 422 for a
validation error, 401 for a bad token, 404 for a repository the token cannot
see.
"""

from __future__ import annotations

import aiohttp

from control.forge.statuses import ForgeState, ForgeTarget, StatusUpdate, post_json, shorten

API_VERSION = "2022-11-28"
MAX_DESCRIPTION = 140
STATES = {
    ForgeState.PENDING: "pending",
    ForgeState.RUNNING: "pending",
    ForgeState.SUCCESS: "success",
    ForgeState.FAILURE: "failure",
    ForgeState.ERROR: "error",
    # GitHub has no canceled state; a canceled build did not pass.
    ForgeState.CANCELED: "error",
}


class GitHubStatuses:
    """``CommitStatuses`` for GitHub and GitHub Enterprise (``api_url``
    ``https://HOST/api/v3``). The caller owns ``session``."""

    forge = "github"

    def __init__(self, session: aiohttp.ClientSession, timeout: float = 10.0) -> None:
        self.session = session
        self.timeout = timeout

    def forge_state(self, state: ForgeState) -> str:
        return STATES[state]

    async def post(self, target: ForgeTarget, update: StatusUpdate) -> None:
        """Raises ``ForgeUnavailable`` or ``ForgeRejected``."""
        body: dict[str, object] = {
            "state": STATES[update.state],
            "description": shorten(update.description, MAX_DESCRIPTION),
            "context": update.context,
        }
        if update.target_url:
            body["target_url"] = update.target_url
        await post_json(
            self.session,
            f"{target.api_url.rstrip('/')}/repos/{target.repo}/statuses/{update.sha}",
            {
                "Authorization": f"Bearer {target.token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": "conveyor",
            },
            body,
            self.timeout,
        )
