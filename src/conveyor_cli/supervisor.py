"""The children of ``conveyor up``, kept alive while it runs and gone with it.

The runner agent is a child process in its own session (a Ctrl-C reaches
``up`` alone, which drains it). It asks the kernel for SIGKILL when ``up``
dies (``conveyor_cli.parent``) and ``RunnerSupervisor`` restarts it with backoff
when it dies on its own. Its identity lives in its work directory, so a
restarted agent ends the builds it held at once.

The embedded PostgreSQL is detached by ``pg_ctl`` (and runs as another user
when ``up`` runs as root, which would clear a parent-death signal anyway):
``PostgresSupervisor`` leaves a watchdog process behind that shuts it down
cleanly when ``up`` dies, and restarts the server with backoff when its
postmaster dies (an OOM kill, a kill -9) while ``up`` runs. The control
plane's pool reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence

import psutil
from prometheus_client import CollectorRegistry, Counter

from common.retry import RetryPolicy
from control.storage.embedded import EmbeddedPostgres, Watchdog
from conveyor_cli.parent import PARENT_ENV

log = logging.getLogger(__name__)

# A child that ran this long before dying starts its backoff over (s).
STABLE_SECONDS = 60.0
# How often the postmaster's liveness is checked (s).
POSTMASTER_POLL = 0.5
# Exit code of `conveyor runner start` for a refused configuration: a
# restart cannot help.
CONFIG_ERROR = 2
RESTART_POLICY = RetryPolicy(base=0.5, cap=30.0, jitter=(0.8, 1.2))


class SupervisorMetrics:
    """The metrics of ``conveyor up`` itself, on the registry its
    ``/metrics`` serves."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.restarts = Counter(
            "conveyor_up_child_restarts_total",
            "Children of conveyor up restarted after they died, by child.",
            ["child"],
            registry=registry,
        )


class RunnerSupervisor:
    """One runner agent child. Call ``start`` once, then run ``watch`` in a
    task until ``stop``. ``watch`` restarts the agent with backoff whenever
    it exits, and returns only when it refused its configuration (exit 2),
    which a restart cannot fix. Raises ``OSError`` when it cannot spawn."""

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        metrics: SupervisorMetrics,
        *,
        drain_seconds: float = 20.0,
        policy: RetryPolicy = RESTART_POLICY,
    ) -> None:
        self.argv = list(argv)
        self.env = {**env, PARENT_ENV: str(os.getpid())}
        self.metrics = metrics
        self.drain_seconds = drain_seconds
        self.policy = policy
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self._stopping = False

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            # Its own session: a Ctrl-C reaches `up`, which drains the
            # runner before it stops the control plane.
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        log.info("runner agent started (pid %d)", self.proc.pid)

    async def watch(self) -> int:
        """Restart the agent until cancelled; return its exit code when it
        refused its configuration."""
        attempt = 0
        while True:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return code
            if code == CONFIG_ERROR:
                log.error("the runner agent refused its configuration (exit %d)", code)
                return code
            ran = time.monotonic() - self.started_at
            attempt = 1 if ran > STABLE_SECONDS else attempt + 1
            delay = self.policy.delay(attempt)
            log.error(
                "the runner agent exited with %s after %.1f s; restarting it in %.1f s",
                code, ran, delay,
            )  # fmt: skip
            self.metrics.restarts.labels(child="runner").inc()
            await asyncio.sleep(delay)
            await self.start()

    async def stop(self) -> None:
        """Drain the agent (SIGTERM), SIGKILL it after ``drain_seconds``."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.drain_seconds)
        except TimeoutError:
            log.warning("the runner agent did not drain in %.0f s; killing it", self.drain_seconds)
            proc.kill()
            await proc.wait()


class PostgresSupervisor:
    """The embedded server of ``conveyor up``. ``start`` starts its
    watchdog, then the server; run ``watch`` in a task until ``stop``,
    which stops the server, then the watchdog. ``start`` raises what
    ``EmbeddedPostgres.start`` raises."""

    def __init__(
        self,
        server: EmbeddedPostgres,
        metrics: SupervisorMetrics,
        *,
        keep_fds: Sequence[int] = (),
        policy: RetryPolicy = RESTART_POLICY,
    ) -> None:
        self.server = server
        self.metrics = metrics
        self.keep_fds = tuple(keep_fds)
        self.policy = policy
        self.watchdog: Watchdog | None = None
        self._postmaster: psutil.Process | None = None
        self._starting: asyncio.Future[str] | None = None

    async def start(self) -> str:
        """Start the server and return its URL."""
        self.watchdog = await asyncio.to_thread(self.server.start_watchdog, self.keep_fds)
        url = await self._start_server()
        # Clients hold the URL: a restarted server must serve on the same port.
        self.server.keep_port()
        return url

    async def _start_server(self) -> str:
        # Shielded: a start under way finishes (and ``stop`` waits for it)
        # rather than leaving a server nobody knows about.
        self._starting = asyncio.ensure_future(asyncio.to_thread(self.server.start))
        url = await asyncio.shield(self._starting)
        pid = self.server.postmaster_pid()
        self._postmaster = psutil.Process(pid) if pid else None
        return url

    def alive(self) -> bool:
        proc = self._postmaster
        try:
            return proc is not None and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    async def watch(self) -> None:
        """Restart the server, with backoff, each time its postmaster dies.
        Runs until cancelled."""
        while True:
            await asyncio.sleep(POSTMASTER_POLL)
            if self.alive():
                continue
            died_at = time.monotonic()
            self.metrics.restarts.labels(child="postgres").inc()
            log.error("the embedded PostgreSQL died; restarting it")
            attempt = 0
            while True:
                attempt += 1
                try:
                    await self._start_server()
                    break
                except Exception as exc:
                    # Backends of a killed postmaster hold its shared memory
                    # until they notice and exit: a retry soon succeeds.
                    delay = self.policy.delay(attempt)
                    log.warning(
                        "the embedded PostgreSQL did not start (attempt %d); retrying in %.1f s:"
                        " %s", attempt, delay, str(exc).splitlines()[0],
                    )  # fmt: skip
                    await asyncio.sleep(delay)
            log.info("the embedded PostgreSQL is back after %.1f s", time.monotonic() - died_at)

    async def stop(self) -> None:
        if self._starting is not None and not self._starting.done():
            with contextlib.suppress(Exception):
                await self._starting
        await asyncio.to_thread(self.server.stop)
        if self.watchdog is not None:
            await asyncio.to_thread(self.watchdog.close)
