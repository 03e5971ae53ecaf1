"""Deploy hooks: ``POST /hooks/deploy/{key}`` builds the hook's branch at
its current head.

Answers: 202 queued, 200 duplicate (a build of that commit has not started
yet: its id is returned and nothing new is queued), 404 unknown or revoked
key, 502 the repository could not be read, 503 database unavailable.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from aiohttp import web

from common.logging_setup import bind
from control.builds.lifecycle import Lifecycle
from control.errors import InvalidArgument, NotFound, Unavailable
from control.forge.remote import RemoteReader
from control.metrics import ControlMetrics
from control.storage.db import Database
from control.storage.hooks import DeployHookStore
from control.storage.projects import ProjectStore
from control.webhooks.receiver import respond

log = logging.getLogger(__name__)


class DeployHookReceiver:
    def __init__(
        self,
        db: Database,
        projects: ProjectStore,
        lifecycle: Lifecycle,
        metrics: ControlMetrics,
        reader: RemoteReader,
    ) -> None:
        self.reader = reader
        self.db = db
        self.projects = projects
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.hooks = DeployHookStore(db)

    async def call(self, request: web.Request) -> web.Response:
        try:
            response, result = await self._call(request.match_info["key"])
        except Unavailable as exc:
            response, result = respond(503, result="unavailable", error=str(exc)), "error"
        self.metrics.forge.deploy_hook_calls.labels(result).inc()
        return response

    async def _call(self, key: str) -> tuple[web.Response, str]:
        received_at = datetime.now(UTC)
        hook = await self.hooks.find(key)
        if hook is None:
            return respond(404, result="not_found", error="no such deploy hook"), "not_found"
        project = await self.projects.get(None, hook.project_id)
        bind(project_id=project.id, account_id=project.account_id)
        # Read the head before taking the hook's lock: ls-remote may take
        # seconds, and other calls of the hook wait on that lock. The reader
        # bounds its time and how many reads of one account run at once.
        try:
            sha = await self.reader.branch_head(project.account_id, project.repo_url, hook.branch)
        except InvalidArgument as exc:
            log.warning("deploy hook %s: %s", hook.id, exc)
            return respond(502, result="error", error=str(exc)), "error"
        async with self.lifecycle.transaction() as conn:
            if await self.hooks.take(conn, key) is None:
                return respond(404, result="not_found", error="no such deploy hook"), "not_found"
            waiting = await self.hooks.waiting_build(conn, project.id, hook.branch, sha)
            if waiting is not None:
                return (
                    respond(200, result="duplicate", build_id=waiting, commit_sha=sha),
                    "duplicate",
                )
            try:
                build_id = await self.lifecycle.queue(
                    project,
                    branch=hook.branch,
                    commit_sha=sha,
                    trigger="hook",
                    received_at=received_at,
                    conn=conn,
                )
            except NotFound:
                return respond(404, result="not_found", error="no such project"), "not_found"
        log.info("deploy hook %s (%s) queued a build", hook.id, hook.name)
        return respond(202, result="queued", build_id=build_id, commit_sha=sha), "queued"
