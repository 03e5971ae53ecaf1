"""A fake of GitLab's commit status API, following its documented shapes.

``POST /api/v4/projects/:id/statuses/:sha`` with ``PRIVATE-TOKEN`` (or
``Authorization: Bearer``); ``:id`` is the project id or its URL-encoded
path; body fields ``state`` (required; pending, running, success, failed or
canceled), ``ref``, ``name`` or ``context`` (default "default"),
``target_url``, ``description``. Answers 201 with the status; 401
"401 Unauthorized"; 404 "404 Project Not Found"; 400 for a missing or invalid
state, and GitLab's state machine refusal for a move it does not allow
(``Cannot transition status via :run from :running``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from tests.fakes.server import FakeServer

STATES = ("pending", "running", "success", "failed", "canceled")
FINAL = ("success", "failed", "canceled")
EVENTS = {
    "pending": "enqueue",
    "running": "run",
    "success": "success",
    "failed": "drop",
    "canceled": "cancel",
}
# Moves the state machine allows from a status that is not finished; a
# finished status is replaced by a new one (a retry).
ALLOWED = {
    "pending": {"running", "success", "failed", "canceled"},
    "running": {"success", "failed", "canceled"},
}
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def _message(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


@dataclass
class FakeGitLab(FakeServer):
    """``tokens`` and ``projects`` (ids or paths, as strings) the fake
    accepts; ``statuses`` every status it created or moved, oldest first."""

    tokens: set[str] = field(default_factory=set)
    projects: set[str] = field(default_factory=set)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    current: dict[tuple[str, str, str], str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The API base URL (``forge_api_url`` of a project)."""
        return f"{self.base}/api/v4"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v4/projects/{id:.+}/statuses/{sha}", self.create_status)

    def states(self, sha: str | None = None) -> list[str]:
        return [s["status"] for s in self.statuses if sha is None or s["sha"] == sha]

    async def create_status(self, request: web.Request) -> web.Response:
        token = request.headers.get("PRIVATE-TOKEN") or request.headers.get(
            "Authorization", ""
        ).removeprefix("Bearer ")
        if token not in self.tokens:
            return _message(401, "401 Unauthorized")
        project = unquote(request.match_info["id"])
        if project not in self.projects:
            return _message(404, "404 Project Not Found")
        sha = request.match_info["sha"]
        if not SHA_RE.match(sha):
            return _message(404, "404 Commit Not Found")
        try:
            body = await request.json()
        except ValueError:
            body = dict(await request.post())
        if not isinstance(body, dict):
            return web.json_response({"error": "state is missing"}, status=400)
        state = body.get("state")
        if state is None:
            return web.json_response({"error": "state is missing"}, status=400)
        if state not in STATES:
            return web.json_response({"error": "state does not have a valid value"}, status=400)
        name = body.get("name") or body.get("context") or "default"
        key = (project, sha, name)
        now_state = self.current.get(key)
        if now_state is not None and now_state not in FINAL and state not in ALLOWED[now_state]:
            event = EVENTS[state]
            return _message(
                400,
                f"Cannot transition status via :{event} from :{now_state}"
                f' (Reason(s): Status cannot transition via "{event}")',
            )
        self.current[key] = state
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        status = {
            "id": len(self.statuses) + 1,
            "sha": sha,
            "ref": body.get("ref") or "main",
            "status": state,
            "name": name,
            "target_url": body.get("target_url"),
            "description": body.get("description"),
            "created_at": now,
            "started_at": now if state != "pending" else None,
            "finished_at": now if state in FINAL else None,
            "allow_failure": False,
            "coverage": None,
            "author": {"id": 1, "username": "conveyor-bot", "name": "Conveyor", "state": "active"},
        }
        self.statuses.append({**status, "project": project})
        return web.json_response(status, status=201)
