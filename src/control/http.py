"""The HTTP side of the control plane: routes, /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from control.api.transcoder import Transcoder
from control.builds.lifecycle import Lifecycle
from control.errors import ConveyorError
from control.forge.remote import RemoteReader
from control.http_limits import BODY_SECONDS, FORM_MAX_BYTES, WebhookBudget, body_deadline
from control.logs.admission import LogAdmission
from control.metrics import ControlMetrics
from control.services.registry import Services
from control.storage import migrate
from control.storage.db import Database
from control.storage.projects import ProjectStore
from control.storage.stats import BuildCounts, build_counts
from control.web.app import mount as mount_dashboard
from control.webhooks.deploy_hooks import DeployHookReceiver
from control.webhooks.receiver import WebhookReceiver, respond

log = logging.getLogger(__name__)

# How long /metrics and /readyz wait for the database: well inside a
# Prometheus scrape timeout and an orchestrator's probe timeout.
DB_PROBE_SECONDS = 2.0


class HttpApp:
    """Builds the aiohttp application: webhooks (``WebhookReceiver``), deploy
    hooks (``DeployHookReceiver``), /metrics, /healthz and /readyz."""

    def __init__(
        self,
        db: Database,
        projects: ProjectStore,
        lifecycle: Lifecycle,
        metrics: ControlMetrics,
        max_body: int,
        *,
        api: Transcoder | None = None,
        services: Services | None = None,
        reader: RemoteReader,
        admission: LogAdmission | None = None,
    ) -> None:
        self.db = db
        self.projects = projects
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.max_body = max_body
        self.api = api
        self.services = services
        self.admission = admission
        metrics.db_pool.watch(db.stats)
        self.webhooks = WebhookReceiver(db, projects, lifecycle, metrics, max_body)
        self.deploy_hooks = DeployHookReceiver(db, projects, lifecycle, metrics, reader)

    def app(self, body_seconds: float = BODY_SECONDS) -> web.Application:
        """The application. A body must arrive within ``body_seconds`` of its
        headers; forms may be ``FORM_MAX_BYTES``, webhooks ``max_body``
        (see ``control.http_limits``)."""
        app = web.Application(
            client_max_size=FORM_MAX_BYTES, middlewares=[body_deadline(body_seconds)]
        )
        budget = WebhookBudget(self.max_body)
        app.router.add_post("/webhooks/github/{project_id}", budget.gate(self.webhooks.github))
        app.router.add_post("/webhooks/gitlab/{project_id}", budget.gate(self.webhooks.gitlab))
        app.router.add_post("/hooks/deploy/{key}", self.deploy_hooks.call)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if self.api is not None:
            self.api.add_to(app)
        if self.services is not None:
            mount_dashboard(app, self.services, self.db)
        return app

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        """Prometheus exposition. The installation-wide build counts are read
        from the database now; when it does not answer within
        ``DB_PROBE_SECONDS`` they are left without samples and the rest is
        served anyway."""
        counts: BuildCounts | None = None
        try:
            async with asyncio.timeout(DB_PROBE_SECONDS), self.db.connection() as conn:
                counts = await build_counts(conn)
        except (ConveyorError, TimeoutError) as exc:
            log.warning("metrics: build counts unavailable: %s", str(exc) or "database timeout")
        self.metrics.build_counts.update(counts)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        """Alive: the event loop answers. Checks nothing else on purpose, so a
        database outage never makes an orchestrator restart healthy replicas."""
        return respond(200, status="ok")

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready: the database answers within ``DB_PROBE_SECONDS`` and has
        every migration this code knows. 503 with ``status`` "unavailable" or
        "migrating" (and the ``pending`` versions) otherwise. While the
        database's disk is below its watermark: 200 with ``status``
        "degraded", a ``reason`` and the ``disk`` figures."""
        try:
            async with asyncio.timeout(DB_PROBE_SECONDS), self.db.connection() as conn:
                pending = await migrate.pending(conn)
        except TimeoutError:
            return respond(503, status="unavailable", reason="the database did not answer in time")
        except (ConveyorError, OSError) as exc:
            return respond(503, status="unavailable", reason=str(exc))
        if pending:
            return respond(503, status="migrating", pending=pending)
        if self.admission is None or not self.admission.probes:
            return respond(200, status="ready")
        disk = self.admission.readiness()
        if self.admission.state.low:
            # 200 all the same: every replica shares the database's disk, so
            # taking them out of rotation would turn a full disk into an
            # outage. Reads, webhooks and builds go on; logs wait.
            return respond(200, status="degraded", reason=self.admission.state.reason(), disk=disk)
        return respond(200, status="ready", disk=disk)
