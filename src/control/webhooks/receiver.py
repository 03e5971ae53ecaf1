"""Receives forge webhooks: verify, parse, dedupe, queue.

Answers: 202 queued, 200 nothing to do (ping, duplicate delivery, branch
deletion, tag push), 202 ignored for other events, 400 malformed, 401 bad
signature or token, 404 unknown project, 413 body over the limit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from control.builds.lifecycle import Lifecycle
from control.domain.project import Project, validate_branch, validate_commit_sha
from control.errors import InvalidArgument, NotFound, Unavailable
from control.logging_setup import bind
from control.metrics import ControlMetrics
from control.storage.builds import is_uuid
from control.storage.db import Database
from control.storage.projects import ProjectStore
from control.webhooks import github, gitlab
from control.webhooks.push import PayloadError, PushEvent

log = logging.getLogger(__name__)


def respond(code: int, **body: object) -> web.Response:
    return web.json_response(body, status=code)


class WebhookReceiver:
    def __init__(
        self,
        db: Database,
        projects: ProjectStore,
        lifecycle: Lifecycle,
        metrics: ControlMetrics,
        max_body: int,
    ) -> None:
        self.db = db
        self.projects = projects
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.max_body = max_body

    async def github(self, request: web.Request) -> web.Response:
        async def check(project: Project, body: bytes) -> bool:
            return github.verify(
                project.webhook_secret, body, request.headers.get("X-Hub-Signature-256")
            )

        return await self._handle(
            request,
            "github",
            check,
            event=request.headers.get("X-GitHub-Event", ""),
            push_event="push",
            ping_event="ping",
            delivery=request.headers.get("X-GitHub-Delivery", ""),
            parse=github.parse_push,
        )

    async def gitlab(self, request: web.Request) -> web.Response:
        async def check(project: Project, body: bytes) -> bool:
            return gitlab.verify(project.webhook_secret, request.headers.get("X-Gitlab-Token"))

        return await self._handle(
            request,
            "gitlab",
            check,
            event=request.headers.get("X-Gitlab-Event", ""),
            push_event="Push Hook",
            ping_event="",
            delivery=request.headers.get("X-Gitlab-Event-UUID", "")
            or request.headers.get("Idempotency-Key", ""),
            parse=gitlab.parse_push,
        )

    async def _handle(
        self,
        request: web.Request,
        provider: str,
        check: Callable[[Project, bytes], Awaitable[bool]],
        *,
        event: str,
        push_event: str,
        ping_event: str,
        delivery: str,
        parse: Callable[[object], PushEvent],
    ) -> web.Response:
        received_at = datetime.now(UTC)
        response = await self._process(
            request, provider, check, event, push_event, ping_event, delivery, parse, received_at
        )
        result = json.loads(response.text or "{}").get("result", str(response.status))
        self.metrics.webhooks.labels(provider, result).inc()
        return response

    async def _process(
        self,
        request: web.Request,
        provider: str,
        check: Callable[[Project, bytes], Awaitable[bool]],
        event: str,
        push_event: str,
        ping_event: str,
        delivery: str,
        parse: Callable[[object], PushEvent],
        received_at: datetime,
    ) -> web.Response:
        project_id = request.match_info["project_id"]
        if not is_uuid(project_id):
            return respond(404, result="unknown_project", error="no such project")
        length = request.content_length
        if length is not None and length > self.max_body:
            return respond(413, result="too_large", error=f"body over {self.max_body} bytes")
        try:
            project = await self.projects.get(None, project_id)
        except NotFound:
            return respond(404, result="unknown_project", error="no such project")
        except Unavailable as exc:
            return respond(503, result="unavailable", error=str(exc))
        # aiohttp runs each request in its own task: the tags end with it.
        bind(project_id=project.id, account_id=project.account_id)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return respond(413, result="too_large", error=f"body over {self.max_body} bytes")
        if not await check(project, body):
            return respond(401, result="bad_signature", error="signature or token does not match")
        if ping_event and event == ping_event:
            return respond(200, result="ping")
        if event != push_event:
            return respond(202, result="ignored", reason=f"event {event!r} is not handled")
        try:
            push = parse(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return respond(400, result="malformed", error="the body is not valid JSON")
        except PayloadError as exc:
            return respond(400, result="malformed", error=str(exc))
        if push.is_tag:
            return respond(200, result="skipped", reason="skipped: tag push")
        if push.deletes_branch:
            return respond(200, result="skipped", reason="skipped: branch deleted")
        branch = push.branch
        try:
            if branch is None:
                raise InvalidArgument("ref", f"{push.ref!r} is not a branch")
            validate_branch("ref", branch)
            validate_commit_sha("after", push.commit_sha)
        except InvalidArgument as exc:
            return respond(400, result="malformed", error=str(exc))
        if len(delivery) > 200:
            return respond(400, result="malformed", error="delivery id is too long")
        async with self.db.transaction() as conn:
            if delivery:
                cur = await conn.execute(
                    "INSERT INTO webhook_deliveries (provider, delivery_id, project_id)"
                    " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                    (
                        request.match_info.route.name or request.path.split("/")[2],
                        delivery,
                        project.id,
                    ),
                )
                if await cur.fetchone() is None:
                    return respond(200, result="duplicate", reason="delivery already processed")
            build_id = await self.lifecycle.queue(
                project,
                branch=branch,
                commit_sha=push.commit_sha,
                trigger="push",
                received_at=received_at,
                conn=conn,
            )
            if delivery:
                await conn.execute(
                    "UPDATE webhook_deliveries SET build_id = %s"
                    " WHERE provider = %s AND delivery_id = %s",
                    (build_id, provider, delivery),
                )
        return respond(202, result="queued", build_id=build_id)
