"""Sends each build's state to its forge as a commit status.

The lifecycle tells ``notify(build_id)`` after every committed change; that
call only puts the id in a bounded queue, so reporting never fails or
delays a build. Worker tasks take ids, read the build's *current* state
from PostgreSQL and send it, retrying with exponential backoff while the
forge is unreachable. Events for a build that is already waiting or being
sent fold into one: the newest state always wins, and a build's statuses
never overtake each other. A status that cannot be delivered shows in the
metrics, in ``forge_status_reports`` and as a warning of the build.

A project reports when it has a forge, a repository and the project secret
``FORGE_TOKEN`` (a GitHub token with the ``repo:status`` scope, or a GitLab
token with the ``api`` scope).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import aiohttp

from common.retry import RetryPolicy
from control.builds.lifecycle import Lifecycle
from control.domain.build import Build
from control.domain.env import FORGE_TOKEN
from control.domain.project import forge_api_allowed
from control.errors import NotFound
from control.forge.github import GitHubStatuses
from control.forge.gitlab import GitLabStatuses
from control.forge.links import Links
from control.forge.statuses import (
    DEFAULT_API,
    CommitStatuses,
    ForgeRejected,
    ForgeTarget,
    ForgeUnavailable,
    StatusUpdate,
    status_of,
)
from control.metrics import ForgeMetrics
from control.storage.forge_reports import ForgeReportStore

log = logging.getLogger(__name__)

TOKEN_NAME = FORGE_TOKEN
CONTEXT_PREFIX = "conveyor"


# Backoff of one status: 8 tries, from 1 s doubling up to a minute (or the
# forge's Retry-After), ±20 % jitter so replicas do not retry in step.
FORGE_RETRY = RetryPolicy(base=1.0, cap=60.0, jitter=(0.8, 1.2), attempts=8)
# Seconds one request to a forge may take.
REQUEST_TIMEOUT = 10.0


class StatusReporter:
    """Owns the worker tasks and the HTTP session. ``start`` registers
    ``notify`` with the lifecycle; ``stop`` unregisters it, gives queued
    statuses up to ``drain_seconds`` to go out, then cancels the workers.
    ``policy`` retries a status the forge did not take (default
    ``FORGE_RETRY``); each request gets ``request_timeout`` seconds."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: ForgeMetrics,
        links: Links,
        policy: RetryPolicy | None = None,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        clients: Mapping[str, CommitStatuses] | None = None,
        queue_size: int = 1000,
        workers: int = 4,
        forge_api_urls: tuple[str, ...] = (),
    ) -> None:
        self.lifecycle = lifecycle
        self.reports = ForgeReportStore(lifecycle.db)
        self.metrics = metrics
        self.links = links
        self.policy = policy or FORGE_RETRY
        self.request_timeout = request_timeout
        self.clients: dict[str, CommitStatuses] = dict(clients or {})
        self.workers = workers
        self.forge_api_urls = frozenset(forge_api_urls)
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self._waiting: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._started = False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        timeout = self.request_timeout
        self.clients.setdefault("github", GitHubStatuses(self._session, timeout))
        self.clients.setdefault("gitlab", GitLabStatuses(self._session, timeout))
        self._tasks = [
            asyncio.create_task(self._work(), name=f"forge-status-{i}") for i in range(self.workers)
        ]
        self._started = True
        self.lifecycle.listeners.append(self.notify)

    async def stop(self, drain_seconds: float = 2.0) -> None:
        if self.notify in self.lifecycle.listeners:
            self.lifecycle.listeners.remove(self.notify)
        self._started = False
        try:
            async with asyncio.timeout(drain_seconds):
                await self._queue.join()
        except TimeoutError:
            log.warning(
                "stopping with %d commit status(es) unsent",
                len(self._waiting) + len(self._active),
            )
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self._session is not None:
            await self._session.close()

    def notify(self, build_id: str) -> None:
        """The build changed: send its state soon. Returns at once, never
        raises; when the queue is full the update is dropped and counted."""
        if build_id in self._active:
            self._dirty.add(build_id)
            wake = self._wake.get(build_id)
            if wake is not None:
                wake.set()
            return
        if build_id in self._waiting or not self._started:
            return
        try:
            self._queue.put_nowait(build_id)
        except asyncio.QueueFull:
            self.metrics.status_reports.labels("", "dropped").inc()
            log.warning("commit status queue full: update dropped", extra={"build_id": build_id})
            return
        self._waiting.add(build_id)
        self.metrics.queue_depth.set(self._queue.qsize())

    async def _work(self) -> None:
        while True:
            build_id = await self._queue.get()
            self._waiting.discard(build_id)
            self._active.add(build_id)
            self.metrics.queue_depth.set(self._queue.qsize())
            try:
                while True:
                    self._dirty.discard(build_id)
                    await self._report(build_id)
                    if build_id not in self._dirty:
                        break
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("commit status not sent", extra={"build_id": build_id})
            finally:
                self._active.discard(build_id)
                self._dirty.discard(build_id)
                self._queue.task_done()

    async def _report(self, build_id: str) -> None:
        """Send the build's current state unless it is already at the forge,
        the project is not connected, or a newer build owns the commit."""
        build = await self._build(build_id)
        if build is None:
            return
        project = await self.lifecycle.projects.get(None, build.project_id)
        extra = {"build_id": build.id, "project_id": project.id}
        client = self.clients.get(project.forge)
        if client is None or not project.forge_repo:
            return
        token = await self._token(project.id)
        if not token:
            self.metrics.status_reports.labels(project.forge, "skipped").inc()
            log.debug("no %s secret: commit status not sent", TOKEN_NAME, extra=extra)
            return
        if await self.reports.newer_build_of_commit(build.id):
            self.metrics.status_reports.labels(project.forge, "skipped").inc()
            return
        state, description = status_of(build)
        update = StatusUpdate(
            sha=build.commit_sha,
            state=state,
            description=description,
            target_url=self.links.build(build.id),
            context=f"{CONTEXT_PREFIX}/{project.name}",
            ref=build.branch,
        )
        last = await self.reports.get(build.id)
        said = client.forge_state(state)
        if last and last.delivered_at and (last.state, last.description) == (said, description):
            return
        if not forge_api_allowed(project.forge, project.forge_api_url, self.forge_api_urls):
            # A base stored before the allow-list existed (or the list shrank):
            # the token goes nowhere the operator did not name.
            self.metrics.status_reports.labels(project.forge, "skipped").inc()
            if not last:
                await self._give_up(
                    build, project.forge, said, update, 0, "forge API base not allowed",
                    f"commit status not sent: forge_api_url {project.forge_api_url!r} is not"
                    " in the operator's allow-list (CONVEYOR_FORGE_API_URLS)",
                )  # fmt: skip
            return
        target = ForgeTarget(
            project.forge,
            project.forge_api_url or DEFAULT_API[project.forge],
            project.forge_repo,
            token,
        )
        await self._deliver(build, client, target, update, said)

    async def _deliver(
        self,
        build: Build,
        client: CommitStatuses,
        target: ForgeTarget,
        update: StatusUpdate,
        said: str,
    ) -> None:
        forge = target.forge
        extra = {"build_id": build.id, "project_id": build.project_id}
        backoff = self.policy.backoff()
        while True:
            attempt = backoff.attempt + 1
            began = time.perf_counter()
            try:
                await client.post(target, update)
            except ForgeRejected as exc:
                self._observe(forge, began, up=True)
                self.metrics.status_reports.labels(forge, "rejected").inc()
                await self._give_up(
                    build, forge, said, update, attempt, str(exc),
                    f"forge rejected the {said!r} commit status: {exc}",
                )  # fmt: skip
                return
            except ForgeUnavailable as exc:
                self._observe(forge, began, up=False)
                delay = backoff.failed(exc, exc.retry_after)
                if delay is None:
                    self.metrics.status_reports.labels(forge, "failed").inc()
                    await self._give_up(
                        build, forge, said, update, attempt, str(exc),
                        f"forge unreachable: the {said!r} commit status was not delivered"
                        f" to {forge} after {attempt} attempts ({exc})",
                    )  # fmt: skip
                    return
                self.metrics.status_reports.labels(forge, "retried").inc()
                await self.reports.save(
                    build.id, forge, said, update.description,
                    delivered=False, attempts=attempt, error=str(exc),
                )  # fmt: skip
                log.info(
                    "%s did not take the commit status (%s); retry %d in %.1f s",
                    forge, exc, attempt, delay, extra=extra,
                )  # fmt: skip
                if await self._newer_state(build.id, delay):
                    return
                continue
            self._observe(forge, began, up=True)
            self.metrics.status_reports.labels(forge, "delivered").inc()
            await self.reports.save(
                build.id, forge, said, update.description, delivered=True, attempts=attempt
            )
            log.info("commit status %s sent to %s", said, forge, extra=extra)
            # Another replica may have moved the build meanwhile, and its
            # status may have reached the forge before ours: look again.
            current = await self._build(build.id)
            if current is not None and current.status != build.status:
                self._dirty.add(build.id)
            return

    async def _give_up(
        self,
        build: Build,
        forge: str,
        said: str,
        update: StatusUpdate,
        attempts: int,
        error: str,
        warning: str,
    ) -> None:
        log.warning(warning, extra={"build_id": build.id, "project_id": build.project_id})
        await self.reports.save(
            build.id, forge, said, update.description,
            delivered=False, attempts=attempts, error=error,
        )  # fmt: skip
        await self.lifecycle.warn(build.id, [warning])

    async def _newer_state(self, build_id: str, delay: float) -> bool:
        """Wait ``delay`` seconds; True as soon as the build changes again
        (its newer state is sent instead of this one)."""
        if build_id in self._dirty:
            return True
        wake = self._wake.setdefault(build_id, asyncio.Event())
        try:
            async with asyncio.timeout(delay):
                await wake.wait()
        except TimeoutError:
            return False
        finally:
            self._wake.pop(build_id, None)
        return True

    def _observe(self, forge: str, began: float, *, up: bool) -> None:
        self.metrics.request_seconds.labels(forge).observe(time.perf_counter() - began)
        self.metrics.up.labels(forge).set(1 if up else 0)

    async def _build(self, build_id: str) -> Build | None:
        """The build as committed now. The lifecycle tells listeners only
        after a change commits, so a build that is not there was deleted
        (its project with it): nothing to report."""
        try:
            return await self.lifecycle.builds.get(None, build_id)
        except NotFound:
            log.info("build gone: no commit status", extra={"build_id": build_id})
            return None

    async def _token(self, project_id: str) -> str:
        async with self.lifecycle.db.connection() as conn:
            for var in await self.lifecycle.env.for_build(conn, project_id):
                if var.name == TOKEN_NAME:
                    return var.value
        return ""
