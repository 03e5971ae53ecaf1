"""Composition root of the control plane: start order, reverse stop order."""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from prometheus_client import CollectorRegistry

from common.retry import RetryPolicy
from common.tasks import cancel_and_wait
from control.api import reflection
from control.api.build_manager_servicer import BuildManagerServicer
from control.api.config_servicer import ConfigServicer
from control.api.edge import Authenticator, EdgeInterceptor
from control.api.runner_servicer import RunnerServicer
from control.api.scheduler_servicer import SchedulerServicer
from control.api.transcoder import Transcoder, routes_of
from control.builds.lifecycle import Lifecycle
from control.config import Settings
from control.forge.links import Links
from control.forge.remote import RemoteReader
from control.forge.reporter import FORGE_RETRY, StatusReporter
from control.http import HttpApp
from control.http_limits import BODY_SECONDS, HEADER_SECONDS
from control.logs.admission import LogAdmission
from control.logs.fanout import LogHub
from control.metrics import ControlMetrics
from control.retention import Retention
from control.scheduler.loop import Scheduler
from control.secrets import SecretBox
from control.services.accounts import AccountService
from control.services.builds import BuildService
from control.services.env import EnvService
from control.services.hooks import HookService
from control.services.projects import ProjectService
from control.services.registry import Services
from control.services.runners import RunnerService
from control.services.tokens import TokenService
from control.storage.accounts import AccountStore
from control.storage.audit import AuditLog
from control.storage.builds import BuildStore
from control.storage.db import Database
from control.storage.env import EnvStore
from control.storage.hooks import DeployHookStore
from control.storage.logs import LogStore
from control.storage.migrate import migrate
from control.storage.notify import Notifier
from control.storage.projects import ProjectStore
from control.storage.pushes import PushLog
from control.storage.runners import RunnerStore
from control.web.sessions import principal_of, require_csrf
from conveyor.v1 import (
    build_manager_pb2,
    build_manager_pb2_grpc,
    config_service_pb2,
    config_service_pb2_grpc,
    runner_service_pb2,
    runner_service_pb2_grpc,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)

log = logging.getLogger(__name__)


def _service(module: Any, name: str) -> ServiceDescriptor:
    """The descriptor of service ``name`` of a generated ``_pb2`` module."""
    found: ServiceDescriptor = module.DESCRIPTOR.services_by_name[name]
    return found


SERVICE_NAMES = (
    config_service_pb2.DESCRIPTOR.services_by_name["ConfigService"].full_name,
    scheduler_service_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
    build_manager_pb2.DESCRIPTOR.services_by_name["BuildManager"].full_name,
    runner_service_pb2.DESCRIPTOR.services_by_name["RunnerService"].full_name,
)
# Enough for a 64 x 5 KB environment and 20,000-line log batches. Only an
# authenticated call is read: the edge turns anyone else away before gRPC
# buffers the message (control.api.edge).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SHUTDOWN_GRACE = 5.0


@dataclass
class ControlPlane:
    """All control-plane services in one process. ``start`` brings them up in
    dependency order and records the bound addresses; ``stop`` undoes it in
    reverse order. Raises psycopg or OS errors from ``start`` unchanged."""

    settings: Settings
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    grpc_port: int = 0
    http_port: int = 0
    admin_account_id: str = ""
    shutdown_grace: float = SHUTDOWN_GRACE
    # How long an HTTP client may take to send a request's headers, and its
    # body after them, before its connection is closed (tests shorten them).
    http_header_seconds: float = HEADER_SECONDS
    http_body_seconds: float = BODY_SECONDS
    # Backoff of commit statuses to forges (tests shorten it).
    forge_retry: RetryPolicy = FORGE_RETRY

    async def start(self) -> None:
        s = self.settings
        self.metrics = ControlMetrics(self.registry)
        self.db = Database(s.database_url)
        await self.db.open()
        async with self.db.connection() as conn:
            applied = await migrate(conn)
        if applied:
            log.info("applied migrations %s", ", ".join(applied))
        self.notifier = Notifier(s.database_url)
        await self.notifier.start()

        self.accounts = AccountStore(self.db)
        self.projects = ProjectStore(self.db)
        self.builds = BuildStore(self.db)
        self.runners = RunnerStore(self.db)
        self.logs = LogStore(self.db)
        # Refuses log batches while the database's disk is low, and closes
        # the logs of an account over its quota.
        self.admission = LogAdmission(self.logs, s.disk, self.metrics.disk)
        await self.admission.start()
        self.env = EnvStore(self.db, SecretBox(s.secret_keys))
        self.audit = AuditLog(self.db)
        if not s.secret_keys:
            log.warning("no secret key configured: projects cannot store secrets")
        await self._bootstrap_tokens()

        self.lifecycle = Lifecycle(
            self.db,
            self.builds,
            self.projects,
            self.runners,
            self.notifier,
            self.metrics,
            s.lifecycle,
            self.env,
            local_repositories=s.repositories.local_allowed,
        )
        self.hub = LogHub(self.logs, self.notifier)
        # Branch heads of manual triggers and deploy hooks (issue 15).
        self.reader = RemoteReader(s.repositories, self.metrics.forge)
        self.services = Services(
            builds=BuildService(
                self.builds,
                self.projects,
                self.lifecycle,
                self.logs,
                self.hub,
                PushLog(self.db),
                reader=self.reader,
            ),
            projects=ProjectService(
                self.projects,
                self.builds,
                self.env,
                reader=self.reader,
                db=self.db,
                audit=self.audit,
                max_run_timeout=s.lifecycle.max_run_timeout,
                forge_api_urls=frozenset(s.forge_api_urls),
            ),
            runners=RunnerService(self.runners),
            env=EnvService(self.db, self.projects, self.env, self.audit),
            tokens=TokenService(self.db, self.audit),
            accounts=AccountService(self.db, self.audit),
            hooks=HookService(self.db, self.projects, DeployHookStore(self.db), self.audit),
        )
        # Commit statuses to GitHub/GitLab: registered with the lifecycle
        # before anything can change a build.
        self.links = Links(s.public_url)
        self.reporter = StatusReporter(
            self.lifecycle, self.metrics.forge, self.links, self.forge_retry,
            forge_api_urls=s.forge_api_urls,
        )  # fmt: skip
        await self.reporter.start()
        self.internal_token = f"cvi_{secrets.token_urlsafe(32)}"

        self.authenticator = Authenticator(self.accounts, self.internal_token)
        self.server = aio.server(
            interceptors=[EdgeInterceptor(self.authenticator, self.metrics)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ],
        )
        host, _, port = s.grpc_addr.rpartition(":")
        if s.tls_cert and s.tls_key:
            self.grpc_port = self.server.add_secure_port(
                f"{host}:{port}", _server_credentials(s.tls_cert, s.tls_key)
            )
        else:
            self.grpc_port = self.server.add_insecure_port(f"{host}:{port}")
        self.grpc_address = f"{host}:{self.grpc_port}"

        # The scheduler reaches the BuildManager through its gRPC stub, the
        # same path as a scheduler in another process would take.
        self._self_channel = self._channel(self.grpc_address)
        bm_stub = build_manager_pb2_grpc.BuildManagerStub(self._self_channel)
        metadata = (("authorization", f"Bearer {self.internal_token}"),)

        async def start_build(build_ids: list[str]) -> set[str]:
            reply = await bm_stub.StartBuild(
                build_manager_pb2.StartBuildRequest(build_ids=build_ids),
                metadata=metadata,
                timeout=10,
            )
            return set(reply.runners)

        self.scheduler = Scheduler(
            self.db,
            self.runners,
            self.notifier,
            self.metrics,
            start_build,
            tick=s.scheduler_tick,
            runner_alive=s.lifecycle.runner_lost_after,
            global_capacity=s.global_capacity,
        )
        config_servicer = ConfigServicer(self.services, self.links)
        config_service_pb2_grpc.add_ConfigServiceServicer_to_server(
            config_servicer,
            self.server,
        )
        scheduler_servicer = SchedulerServicer(
            self.scheduler, self.db, s.lifecycle.runner_lost_after
        )
        scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(
            scheduler_servicer, self.server
        )
        build_manager_servicer = BuildManagerServicer(
            self.lifecycle, self.builds, self.logs, self.hub, self.metrics, self.services
        )
        build_manager_pb2_grpc.add_BuildManagerServicer_to_server(
            build_manager_servicer, self.server
        )
        # The HTTP/JSON API calls these same servicers, routed by the
        # google.api.http annotations of their methods.
        self.api_routes = routes_of(
            {
                _service(config_service_pb2, "ConfigService"): config_servicer,
                _service(scheduler_service_pb2, "SchedulerService"): scheduler_servicer,
                _service(build_manager_pb2, "BuildManager"): build_manager_servicer,
            }
        )
        runner_service_pb2_grpc.add_RunnerServiceServicer_to_server(
            RunnerServicer(
                self.lifecycle,
                self.runners,
                self.logs,
                self.hub,
                self.notifier,
                self.metrics,
                s.lifecycle.heartbeat_interval,
                self.admission,
            ),
            self.server,
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable((*SERVICE_NAMES, HEALTH_SERVICE), self.server)
        await self.server.start()
        for name in (*SERVICE_NAMES, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

        self.api = Transcoder(
            self.api_routes,
            self.authenticator,
            self.metrics,
            cookie_auth=principal_of,
            csrf_check=require_csrf,
        )
        http = HttpApp(
            self.db,
            self.projects,
            self.lifecycle,
            self.metrics,
            s.webhook_max_bytes,
            api=self.api,
            services=self.services,
            reader=self.reader,
            admission=self.admission,
        )
        # keepalive_timeout doubles as the header timeout: aiohttp drops a
        # connection that has not sent a whole request head by then.
        self.http_runner = web.AppRunner(
            http.app(self.http_body_seconds),
            access_log=None,
            shutdown_timeout=2.0,
            keepalive_timeout=self.http_header_seconds,
        )
        await self.http_runner.setup()
        hhost, _, hport = s.http_addr.rpartition(":")
        ssl_context = None
        if s.tls_cert and s.tls_key:
            import ssl

            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(s.tls_cert, s.tls_key)
        site = web.TCPSite(self.http_runner, hhost, int(hport), ssl_context=ssl_context)
        await site.start()
        self.http_port = _bound_port(self.http_runner, int(hport))
        scheme = "https" if ssl_context else "http"
        self.http_url = f"{scheme}://{hhost}:{self.http_port}"
        if not s.public_url:
            self.links.base = self.http_url

        self.scheduler.start()
        self._alarms = asyncio.create_task(self._alarm_loop(), name="alarms")
        self.retention = Retention(s.database_url, s.retention, self.metrics.retention)
        self.retention.start()
        log.info(
            "control plane serving gRPC on %s and HTTP on %s", self.grpc_address, self.http_url
        )

    def _channel(self, address: str) -> aio.Channel:
        if self.settings.tls_cert:
            # Trust the CA when one is given, else the (self-signed) cert.
            root = Path(self.settings.tls_ca or self.settings.tls_cert).read_bytes()
            return aio.secure_channel(
                address,
                grpc.ssl_channel_credentials(root_certificates=root),
                options=[("grpc.ssl_target_name_override", "localhost")],
            )
        return aio.insecure_channel(address)

    async def _bootstrap_tokens(self) -> None:
        s = self.settings
        self.admin_account_id = await self.accounts.ensure_account(s.default_account)
        if s.admin_token:
            await self.accounts.add_token(
                str(uuid.uuid5(uuid.NAMESPACE_URL, "admin:" + s.admin_token)),
                self.admin_account_id,
                "admin",
                "user",
                # The bootstrap token also holds "system": it creates
                # accounts and rotates the secret key.
                ("admin", "system"),
                s.admin_token,
            )
        if s.runner_token:
            await self.accounts.add_token(
                str(uuid.uuid5(uuid.NAMESPACE_URL, "runner:" + s.runner_token)),
                None,
                "runner",
                "runner",
                (),
                s.runner_token,
            )

    async def _alarm_loop(self) -> None:
        """Fire due build alarms and reap lost runners, once a second."""
        while True:
            await asyncio.sleep(self.settings.lifecycle.alarm_poll)
            try:
                await self.lifecycle.fire_alarms()
                await self.lifecycle.reap_lost_runners()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alarm pass failed")

    async def stop(self) -> None:
        """Undo ``start`` in reverse order. Health turns NOT_SERVING first,
        so balancers and ``Watch`` clients move away while this process still
        answers; then the alarm and scheduler loops stop, the HTTP side
        closes, live log follows end with UNAVAILABLE (their viewers resume
        from their cursor on another replica), the gRPC server refuses new
        calls and gives in-flight ones ``shutdown_grace`` seconds before it
        cancels them, queued commit statuses get a moment to reach their
        forges, and last the LISTEN connection and the pool close."""
        await self.health.enter_graceful_shutdown()
        await cancel_and_wait(self._alarms)
        await self.retention.stop()
        await self.scheduler.stop()
        await self.http_runner.cleanup()
        self.hub.close()
        await self.server.stop(self.shutdown_grace)
        await self._self_channel.close(None)
        await self.reporter.stop()
        await self.admission.stop()
        await self.notifier.stop()
        await self.db.close()
        log.info("control plane stopped")


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    """The port a site bound (port 0 picks a free one)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return requested


def _server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
