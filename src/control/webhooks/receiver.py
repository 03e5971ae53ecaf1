"""Receives forge webhooks: verify, parse, dedupe, then queue or record why not.

Answers: 202 queued (a push or a pull/merge request that builds), 200 with
``result`` "skipped" and the reason (a push that does not build: tag push or
deletion, branch deletion, branch rules, ``[skip ci]``, watch paths; the
reason is stored and ``conveyor builds list --all`` shows it), 200
"canceled" (a closed request's builds), 200 "ping", 200 "duplicate" (a
delivery id seen before, or a push of a commit to a branch that a push built
within ``REPLAY_WINDOW``; with that ``build_id`` when there is one), 202
"ignored" for other events and actions, 400 malformed (the body, a field, or
a missing delivery id header, named), 401 bad signature or token, 404
unknown project, 413 body over the limit, 503 database unavailable.

Bodies are JSON, or GitHub's ``application/x-www-form-urlencoded`` form
with the JSON in its ``payload`` field; the signature covers the raw body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web

from common.logging_setup import bind
from control.builds.lifecycle import Lifecycle
from control.domain.project import (
    Project,
    validate_branch,
    validate_commit_sha,
    validate_forge,
    without_fork_privileges,
)
from control.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from control.metrics import ControlMetrics
from control.storage.db import RETRY_AFTER, Conn, Database
from control.storage.ids import is_uuid
from control.storage.projects import ProjectStore
from control.storage.pushes import PushLog
from control.webhooks import github, gitlab, rules
from control.webhooks.push import (
    ForgeRepo,
    PayloadError,
    PullRequestEvent,
    PushEvent,
    RequestAction,
    decode_payload,
)

log = logging.getLogger(__name__)

MAX_DELIVERY_ID = 200
# GitHub signs the body only: neither the delivery id nor a time is covered,
# so anyone who saw one signed push can send it again under a new id. A push
# of a commit to a branch that a push already built within this window is
# answered with that build instead of queueing another. (A force-push back to
# such a commit within the window builds nothing either: `conveyor builds
# retry` or `builds trigger --commit` rebuild it on purpose.)
REPLAY_WINDOW = timedelta(hours=1)
FORK_WARNING = (
    "pull request from another repository: built without the project's secrets"
    " and without its preview step (the project's fork_secrets is off)"
)


def respond(code: int, **body: object) -> web.Response:
    return web.json_response(body, status=code)


@dataclass(frozen=True)
class Delivery:
    """One webhook request, verified: whose, which event, which delivery."""

    provider: str
    event: str
    delivery_id: str
    project: Project
    received_at: datetime


Parser = Callable[[object], PushEvent | PullRequestEvent]


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
        self.pushes = PushLog(db)

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
            ping_event="ping",
            delivery_headers=("X-GitHub-Delivery",),
            parsers={"push": github.parse_push, "pull_request": github.parse_pull_request},
        )

    async def gitlab(self, request: web.Request) -> web.Response:
        async def check(project: Project, body: bytes) -> bool:
            return gitlab.verify(project.webhook_secret, request.headers.get("X-Gitlab-Token"))

        return await self._handle(
            request,
            "gitlab",
            check,
            event=request.headers.get("X-Gitlab-Event", ""),
            ping_event="",
            # Idempotency-Key (GitLab 17.4+) is one per hook and delivery and
            # stays the same on a retry; X-Gitlab-Event-UUID (older GitLab)
            # names the event, the same for each hook it triggers.
            delivery_headers=("Idempotency-Key", "X-Gitlab-Event-UUID"),
            parsers={
                "Push Hook": gitlab.parse_push,
                "Tag Push Hook": gitlab.parse_push,
                "Merge Request Hook": gitlab.parse_merge_request,
            },
        )

    async def _handle(
        self,
        request: web.Request,
        provider: str,
        check: Callable[[Project, bytes], Awaitable[bool]],
        *,
        event: str,
        ping_event: str,
        delivery_headers: tuple[str, ...],
        parsers: dict[str, Parser],
    ) -> web.Response:
        received_at = datetime.now(UTC)
        try:
            response = await self._process(
                request, provider, check, event, ping_event, delivery_headers, parsers, received_at
            )
        except FailedPrecondition as exc:
            # The project cannot build as it stands (a local repository on a
            # control plane that no longer allows them): nothing was stored,
            # and a redelivery gets the same answer until the project changes.
            response = respond(422, result="refused", error=str(exc))
        except Unavailable as exc:
            response = respond(503, result="unavailable", error=str(exc))
            # Forges redeliver; tell them when the database may be back.
            response.headers["Retry-After"] = str(RETRY_AFTER)
        result = json.loads(response.text or "{}").get("result", str(response.status))
        self.metrics.webhooks.labels(provider, result).inc()
        return response

    async def _process(
        self,
        request: web.Request,
        provider: str,
        check: Callable[[Project, bytes], Awaitable[bool]],
        event: str,
        ping_event: str,
        delivery_headers: tuple[str, ...],
        parsers: dict[str, Parser],
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
        # aiohttp runs each request in its own task: the tags end with it.
        bind(project_id=project.id, account_id=project.account_id)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return respond(413, result="too_large", error=f"body over {self.max_body} bytes")
        if not await check(project, body):
            return respond(401, result="bad_signature", error="signature or token does not match")
        delivery = next(
            (value for name in delivery_headers if (value := request.headers.get(name, ""))), ""
        )
        header = " or ".join(delivery_headers)
        if not delivery:
            # Forges always send one; without it a redelivery cannot be told
            # from a new push.
            return respond(400, result="malformed", error=f"header {header} is missing")
        if len(delivery) > MAX_DELIVERY_ID or not delivery.isprintable():
            return respond(
                400,
                result="malformed",
                error=f"header {header} must be at most {MAX_DELIVERY_ID} printable characters",
            )
        if ping_event and event == ping_event:
            await self._ping(project, body, request.content_type)
            return respond(200, result="ping")
        parse = parsers.get(event)
        if parse is None:
            return respond(202, result="ignored", reason=f"event {event!r} is not handled")
        try:
            parsed = parse(decode_payload(body, request.content_type))
        except PayloadError as exc:
            return respond(400, result="malformed", error=str(exc))
        hook = Delivery(provider, event, delivery, project, received_at)
        if isinstance(parsed, PushEvent):
            return await self._push(hook, parsed)
        return await self._request(hook, parsed)

    async def _push(self, hook: Delivery, push: PushEvent) -> web.Response:
        branch = push.branch
        try:
            if not push.is_tag:
                if branch is None:
                    raise InvalidArgument("ref", f"{push.ref!r} is not a branch")
                validate_branch("ref", branch)
                if not push.deletes_branch:
                    validate_commit_sha("after", push.commit_sha)
        except InvalidArgument as exc:
            return respond(400, result="malformed", error=str(exc))
        project = hook.project
        async with self.lifecycle.transaction() as conn:
            if not await self._first_delivery(conn, hook):
                return await self._duplicate(conn, hook)
            await self._connect(conn, project, push.repo)
            reason = rules.skip_reason(project, push)
            if reason is None:
                assert branch is not None
                earlier = await self.pushes.recent_push_build(
                    conn, project.id, branch, push.commit_sha, REPLAY_WINDOW
                )
                if earlier is not None:
                    await self.pushes.set_delivery_build(
                        conn, hook.provider, hook.delivery_id, project.id, earlier
                    )
                    log.info("push of %s at %s built already", push.ref, push.commit_sha)
                    return respond(
                        200,
                        result="duplicate",
                        reason=f"a push of this commit to {branch} built within the last"
                        f" {_span(REPLAY_WINDOW)}",
                        build_id=earlier,
                    )
            if reason is not None:
                skip_id = await self.pushes.record_skip(
                    conn,
                    project_id=project.id,
                    account_id=project.account_id,
                    provider=hook.provider,
                    event=hook.event,
                    ref=push.ref,
                    # A tag is shown from its ref, never as a branch.
                    branch=branch or "",
                    commit_sha="" if push.deletes_branch else push.commit_sha,
                    reason=reason,
                    delivery_id=hook.delivery_id,
                )
            else:
                assert branch is not None
                build_id = await self.lifecycle.queue(
                    project,
                    branch=branch,
                    commit_sha=push.commit_sha,
                    trigger="push",
                    received_at=hook.received_at,
                    conn=conn,
                )
                await self._delivered(conn, hook, build_id)
        if reason is not None:
            self.metrics.forge.pushes_skipped.labels(
                hook.provider, rules.reason_label(reason)
            ).inc()
            log.info("push of %s not built: %s", push.ref, reason)
            return respond(200, result="skipped", reason=reason, skip_id=skip_id)
        return respond(202, result="queued", build_id=build_id)

    async def _request(self, hook: Delivery, pull: PullRequestEvent) -> web.Response:
        if pull.kind == RequestAction.IGNORE:
            return respond(202, result="ignored", reason=pull.ignore_reason)
        try:
            validate_branch("branch", pull.branch)
            validate_commit_sha("sha", pull.commit_sha)
        except InvalidArgument as exc:
            return respond(400, result="malformed", error=str(exc))
        project = hook.project
        async with self.lifecycle.transaction() as conn:
            if not await self._first_delivery(conn, hook):
                return await self._duplicate(conn, hook)
            await self._connect(conn, project, pull.repo)
            if pull.kind == RequestAction.CLOSE:
                open_builds = await self.pushes.open_pull_request_builds(
                    conn, project.id, pull.number
                )
            else:
                build_id = await self.lifecycle.queue(
                    # Its steps as the runner will get them (see dispatch).
                    without_fork_privileges(project) if pull.from_fork else project,
                    branch=pull.branch,
                    commit_sha=pull.commit_sha,
                    trigger="pull_request",
                    production=False,
                    received_at=hook.received_at,
                    conn=conn,
                )
                await self.pushes.record_pull_request_build(
                    conn, build_id, project.id, pull.number, fork=pull.from_fork
                )
                if pull.from_fork and not project.fork_secrets:
                    await self.lifecycle.builds.add_warnings(conn, build_id, [FORK_WARNING])
                await self._delivered(conn, hook, build_id)
        if pull.kind == RequestAction.BUILD:
            return respond(202, result="queued", build_id=build_id)
        what = (
            f"pull request #{pull.number}"
            if hook.provider == "github"
            else f"merge request !{pull.number}"
        )
        verb = "merged" if pull.action == "merge" else "closed"
        canceled = []
        for build_id in open_builds:
            try:
                await self.lifecycle.cancel(None, build_id, f"{what} {verb}")
                canceled.append(build_id)
            except (FailedPrecondition, NotFound):
                pass  # it ended meanwhile
        log.info("%s %s: %d build(s) canceled", what, verb, len(canceled))
        return respond(200, result="canceled", build_ids=canceled)

    async def _ping(self, project: Project, body: bytes, content_type: str) -> None:
        """GitHub pings a new webhook with its repository: connect the
        project's forge then, before any push."""
        try:
            payload = decode_payload(body, content_type)
        except PayloadError:
            return
        if isinstance(payload, dict):
            async with self.db.transaction() as conn:
                await self._connect(conn, project, github.repository(payload))

    async def _first_delivery(self, conn: Conn, hook: Delivery) -> bool:
        """Record the delivery id; False when it was seen before."""
        return await self.pushes.claim_delivery(
            conn, hook.provider, hook.delivery_id, hook.project.id
        )

    async def _duplicate(self, conn: Conn, hook: Delivery) -> web.Response:
        """The answer to a redelivery: the build it queued, if it did."""
        build_id = await self.pushes.delivery_build(
            conn, hook.provider, hook.delivery_id, hook.project.id
        )
        extra = {"build_id": build_id} if build_id else {}
        return respond(200, result="duplicate", reason="delivery already processed", **extra)

    async def _delivered(self, conn: Conn, hook: Delivery, build_id: str) -> None:
        await self.pushes.set_delivery_build(
            conn, hook.provider, hook.delivery_id, hook.project.id, build_id
        )

    async def _connect(self, conn: Conn, project: Project, repo: ForgeRepo | None) -> None:
        """Fill the project's empty forge and repository from the signed
        payload. Only the repository's name comes from it: the forge is the
        endpoint the delivery came to, and the API base stays the project's
        setting (a payload naming its own server must not receive the
        forge token)."""
        if repo is None or not repo.repo or project.forge not in ("", repo.forge):
            return
        if project.forge and project.forge_repo:
            return
        try:
            validate_forge(repo.forge, "", repo.repo)
        except InvalidArgument as exc:
            log.info("payload names no usable repository (%s); forge not connected", exc)
            return
        await self.projects.connect_forge(conn, project.id, repo.forge, repo.repo)


def _span(window: timedelta) -> str:
    """``REPLAY_WINDOW`` in words: "hour", "2 hours", "30 minutes"."""
    minutes = int(window.total_seconds() // 60)
    if minutes % 60 == 0:
        hours = minutes // 60
        return "hour" if hours == 1 else f"{hours} hours"
    return f"{minutes} minutes"
