"""A fake of GitHub's commit statuses API, following its documented shapes.

``POST /repos/{owner}/{repo}/statuses/{sha}`` with ``Authorization: Bearer
<token>`` (or ``token <token>``) and a JSON body: ``state`` (required; error,
failure, pending or success), ``target_url``, ``description`` (at most 140
characters), ``context`` (default "default"). Answers 201 with the status
object; 401 "Bad credentials"; 404 "Not Found" for a repository the token
cannot see; 422 "Validation Failed" with an ``errors`` list for a bad field,
or "No commit found for SHA" for an unknown commit; 400 "Problems parsing
JSON".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes.server import FakeServer

STATES = ("error", "failure", "pending", "success")
DOCS = "https://docs.github.com/rest/commits/statuses#create-a-commit-status"
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response(
        {"message": message, **extra, "documentation_url": DOCS, "status": str(status)},
        status=status,
    )


def _invalid(field_name: str, message: str) -> web.Response:
    return _error(
        422,
        "Validation Failed",
        errors=[{"resource": "Status", "code": "custom", "field": field_name, "message": message}],
    )


@dataclass
class FakeGitHub(FakeServer):
    """``tokens`` and ``repos`` ("owner/repo") the fake accepts; ``statuses``
    every status it created, oldest first."""

    tokens: set[str] = field(default_factory=set)
    repos: set[str] = field(default_factory=set)
    statuses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The API base URL (``forge_api_url`` of a project)."""
        return self.base

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/repos/{owner}/{repo}/statuses/{sha}", self.create_status)

    def states(self, sha: str | None = None) -> list[str]:
        return [s["state"] for s in self.statuses if sha is None or s["sha"] == sha]

    async def create_status(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() not in ("bearer", "token") or token not in self.tokens:
            return _error(401, "Bad credentials")
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        if repo not in self.repos:
            return _error(404, "Not Found")
        sha = request.match_info["sha"]
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Problems parsing JSON")
        if not isinstance(body, dict):
            return _error(400, "Problems parsing JSON")
        if not SHA_RE.match(sha):
            return _error(422, f"No commit found for SHA: {sha}")
        state = body.get("state")
        if state not in STATES:
            return _invalid("state", "state is not included in the list")
        description = body.get("description")
        if description is not None and (not isinstance(description, str) or len(description) > 140):
            return _invalid("description", "description is too long (maximum is 140 characters)")
        target_url = body.get("target_url")
        if target_url is not None and not (
            isinstance(target_url, str) and target_url.startswith(("http://", "https://"))
        ):
            return _invalid("target_url", "target_url must use http(s) scheme")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "url": f"{self.base}/repos/{repo}/statuses/{sha}",
            "avatar_url": None,
            "id": len(self.statuses) + 1,
            "node_id": f"SC_{len(self.statuses) + 1}",
            "state": state,
            "description": description,
            "target_url": target_url,
            "context": body.get("context") or "default",
            "created_at": now,
            "updated_at": now,
            "creator": {"login": "conveyor-bot", "id": 1, "type": "Bot", "site_admin": False},
        }
        self.statuses.append({**status, "sha": sha, "repo": repo})
        return web.json_response(status, status=201, headers={"Location": status["url"]})
