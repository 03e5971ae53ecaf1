"""One build on this runner: launch, read output, report steps and status.

Order matters for "never lose a log line": the last log batch is
acknowledged before the final status is reported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from common.logging_setup import bind
from common.tasks import cancel_and_wait
from runner.cache import BuildCache, scope_for
from runner.cache_run import CacheRun, CacheTarget
from runner.control_client import RPC_RETRY, ControlClient
from runner.domain import (
    Assignment,
    BuildStatus,
    Outcome,
    StatusReport,
    StepStatus,
    StepUpdate,
)
from runner.launchers.base import (
    Job,
    JobResult,
    JobSpec,
    Launcher,
    LaunchError,
    Limits,
    OutputLine,
)
from runner.logbatch import LogBatcher
from runner.masking import Masker
from runner.metrics import RunnerMetrics
from runner.script import BuildScript, CachePlan

log = logging.getLogger(__name__)

# Reports are retried this long through a control-plane outage.
REPORT_PATIENCE = 600.0
# A cache is stored only while this much of the run deadline is left.
STORE_MARGIN = 10.0
# The build's warning (`conveyor builds show`) when its runner has no sandbox.
NO_SANDBOX_BUILD_WARNING = "build ran WITHOUT a sandbox (its runner runs with --sandbox none)"


@dataclass
class StepState:
    name: str
    started: float = 0.0


class BuildRun:
    """Runs one assignment. ``run`` returns when the build is reported final;
    ``cancel`` may be called at any time."""

    def __init__(
        self,
        assignment: Assignment,
        client: ControlClient,
        launcher: Launcher,
        metrics: RunnerMetrics,
        limits: Limits,
        sandboxed: bool,
        *,
        cache: BuildCache | None = None,
        cache_staging: Path | None = None,
    ) -> None:
        self.a = assignment
        self.cache = cache
        self.cache_staging = cache_staging
        self.client = client
        self.launcher = launcher
        self.metrics = metrics
        self.limits = limits
        self.sandboxed = sandboxed
        self.build_id = assignment.build_id
        self.extra = {"build_id": self.build_id, "project_id": assignment.project_id}
        self.job: Job | None = None
        self.cancel_reason: str | None = None
        self.timed_out = False
        self.steps = ["clone", *assignment.step_names]
        self._reports: asyncio.Queue[StatusReport | None] = asyncio.Queue()
        self._closed = asyncio.Event()
        self.received = time.perf_counter()

    async def cancel(self, reason: str, grace: float) -> None:
        self.cancel_reason = self.cancel_reason or reason
        if self.job is not None:
            await self.job.stop(grace)

    def _report(
        self,
        status: BuildStatus | None = None,
        *,
        reason: str = "",
        steps: tuple[StepUpdate, ...] = (),
        warnings: tuple[str, ...] = (),
    ) -> None:
        self._reports.put_nowait(
            StatusReport(
                build_id=self.build_id,
                at=datetime.now(UTC),
                status=status,
                reason=reason,
                steps=steps,
                warnings=warnings,
            )
        )

    async def _report_loop(self) -> None:
        """Send reports in order; retry through outages; stop the job when
        the control plane says the build is closed."""
        while (request := await self._reports.get()) is not None:
            backoff = replace(RPC_RETRY, deadline=REPORT_PATIENCE).backoff()
            while True:
                try:
                    await self.client.report(self.a.build_token, request)
                    break
                except Exception as exc:
                    if await backoff.wait(exc):
                        continue
                    log.warning("status report refused: %s", exc, extra=self.extra)
                    self._closed.set()
                    if self.job is not None:
                        await self.job.stop(self.a.kill_grace_seconds or 10)
                    break

    async def run(self) -> BuildStatus:
        """Run the build to its end; return the final status reported.

        Run it as its own task: it tags that task's log context with the
        build, so every line logged inside (and in the tasks it starts) has
        the build and project ids."""
        bind(build_id=self.build_id, project_id=self.a.project_id or None)
        reporter = asyncio.create_task(self._report_loop())
        batcher = LogBatcher(self.client, self.build_id, self.a.build_token, self.metrics)
        try:
            outcome = await self._run(batcher)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("build failed inside the runner", extra=self.extra)
            outcome = Outcome(BuildStatus.ERRORED, f"runner error: {exc}")
        try:
            await asyncio.wait_for(batcher.close(), REPORT_PATIENCE)
        except TimeoutError:
            await batcher.abort()
        self._report(outcome.status, reason=outcome.reason)
        self._reports.put_nowait(None)
        await reporter
        # An outcome's status is a final one, whose value is its metric label.
        self.metrics.builds.labels(outcome.status.value).inc()
        log.info("build finished: %s %s", outcome.status.value, outcome.reason, extra=self.extra)
        return outcome.status

    async def _run(self, batcher: LogBatcher) -> Outcome:
        a = self.a
        warnings = () if self.sandboxed else (NO_SANDBOX_BUILD_WARNING,)
        self._report(BuildStatus.INITIALIZING, warnings=warnings)
        secrets = {e.name: e.value for e in a.env if e.secret}
        masker = Masker(secrets.values())
        cache_run = await self._cache_run(batcher)
        try:
            return await self._launch_and_follow(batcher, masker, secrets, cache_run)
        except LaunchError as exc:
            self.metrics.launcher_errors.labels(self.launcher.name).inc()
            await batcher.add("system", f"could not start the build: {exc}")
            return Outcome(BuildStatus.ERRORED, str(exc))
        finally:
            if cache_run is not None:
                cache_run.close()

    async def _launch_and_follow(
        self,
        batcher: LogBatcher,
        masker: Masker,
        secrets: dict[str, str],
        cache_run: CacheRun | None,
    ) -> Outcome:
        """Launch the job, follow it to its end, store its cache. Raises
        ``LaunchError``; the caller closes ``cache_run``."""
        a = self.a
        script = BuildScript(
            repo_url=a.repo_url,
            commit_sha=a.commit_sha,
            branch=a.branch,
            steps=tuple(zip(a.step_names, a.step_commands, strict=True)),
            root_directory=a.root_directory,
            nonce=BuildScript.new_nonce(),
            cache=cache_run.plan if cache_run else None,
            channel=self.launcher.control_channel,
        )
        env = {
            "CI": "true",
            "CONVEYOR": "true",
            "CONVEYOR_BUILD_ID": a.build_id,
            "CONVEYOR_COMMIT_SHA": a.commit_sha,
            "CONVEYOR_BRANCH": a.branch,
            "CONVEYOR_PROJECT": a.project_name,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
        }
        env.update({e.name: e.value for e in a.env if not e.secret})
        local_paths: tuple[str, ...] = ()
        if a.repo_url.startswith("/"):
            local_paths = (a.repo_url,)
        elif a.repo_url.startswith("file://"):
            local_paths = (a.repo_url.removeprefix("file://"),)
        spec = JobSpec(
            build_id=a.build_id,
            script=script.render(),
            env=env,
            secret_env=secrets,
            limits=self.limits,
            network=not a.network_isolated,
            local_paths=local_paths,
            cache_fds=cache_run.pipes.job_fds if cache_run else None,
        )
        try:
            self.job = await self.launcher.launch(spec)
        finally:
            if cache_run is not None:
                cache_run.pipes.close_job_ends()
        self.metrics.launch_seconds.observe(time.perf_counter() - self.received)
        if self.cancel_reason is not None:
            await self.job.stop(a.kill_grace_seconds or 10)
        self._report(BuildStatus.RUNNING)
        # The control plane's run deadline counts from here (about).
        deadline = time.monotonic() + (a.run_timeout_seconds or 1200)
        watchdog = asyncio.create_task(self._wall_clock())
        try:
            failed_step = await self._follow(self.job, script, masker, batcher, cache_run)
            result = await self.job.wait()
        finally:
            await cancel_and_wait(watchdog)
        final = self._final(result, failed_step)
        if cache_run is not None:
            # Storing must not run the build into its deadline: it would
            # end timed out after its deploy succeeded.
            budget = deadline - time.monotonic() - STORE_MARGIN
            await cache_run.finish(final.status is BuildStatus.SUCCEEDED, budget)
        return final

    async def _cache_run(self, batcher: LogBatcher) -> CacheRun | None:
        """The build's cache work, or None (with a log line saying why, when
        the project wants a cache this runner cannot give it)."""
        a = self.a
        if not (a.cache_lockfiles and a.cache_paths):
            return None  # the project turned its cache off
        if self.cache is None or self.cache_staging is None:
            await batcher.add("system", "cache: this runner has no build cache configured")
            return None
        if not self.launcher.supports_cache:
            await batcher.add(
                "system", f"cache: the {self.launcher.name} launcher does not restore or save it"
            )
            return None
        plan = CachePlan(tuple(a.cache_lockfiles), tuple(a.cache_paths)).usable()
        scope = scope_for(a.production, a.branch, a.pull_request)
        target = CacheTarget(a.project_id, a.cache_generation, scope)

        async def say(text: str) -> None:
            await batcher.add("system", text)

        return CacheRun(
            self.cache, plan, target,
            staging_dir=self.cache_staging, build_id=self.build_id, say=say, metrics=self.metrics,
        )  # fmt: skip

    async def _follow(
        self,
        job: Job,
        script: BuildScript,
        masker: Masker,
        batcher: LogBatcher,
        cache_run: CacheRun | None,
    ) -> str | None:
        failed: str | None = None
        current: StepState | None = None
        own = f"##conveyor:{script.nonce}:".encode()
        async for out in job.output():
            data = out.data
            if out.stream == "stdout" and not script.channel:
                at = data.find(own, 1)
                if at > 0:
                    # Output without a final newline runs into the marker
                    # the script prints next: split them.
                    text = data[:at].decode("utf-8", errors="replace")
                    await batcher.add(out.stream, masker.mask(text))
                    data = data[at:]
            if out.stream in ("stdout", "control"):
                marker = script.marker_of(OutputLine(out.stream, data))
                if marker is not None and marker.kind.startswith("cache-"):
                    if cache_run is not None:
                        await cache_run.on_marker(marker)
                    continue
                if marker is not None:
                    now = datetime.now(UTC)
                    if marker.index >= len(self.steps):
                        continue
                    name = self.steps[marker.index]
                    if marker.kind == "begin":
                        current = StepState(name, time.monotonic())
                        await batcher.add("system", f"── step {name} ──")
                        self._report(
                            steps=(StepUpdate(marker.index, name, StepStatus.RUNNING, now),)
                        )
                    else:
                        code = marker.exit_code if marker.exit_code is not None else -1
                        took = time.monotonic() - current.started if current else 0.0
                        await batcher.add(
                            "system", f"── step {name} exited with {code} after {took:.2f} s ──"
                        )
                        if code != 0:
                            failed = name
                        self._report(steps=(StepUpdate(
                            marker.index, name,
                            StepStatus.SUCCEEDED if code == 0 else StepStatus.FAILED,
                            now, exit_code=code,
                        ),))  # fmt: skip
                        current = None
                    continue
            if out.stream == "control":
                continue  # the script's, never the build's output
            text = data.decode("utf-8", errors="replace")
            if batcher.add_nowait(out.stream, masker.mask(text)):
                await batcher.flush()
        return failed

    def _final(self, result: JobResult, failed_step: str | None) -> Outcome:
        if self.timed_out:
            return Outcome(BuildStatus.TIMED_OUT, f"run deadline of {self.a.run_timeout_seconds} s")
        if self.cancel_reason is not None:
            return Outcome(BuildStatus.CANCELED, self.cancel_reason)
        if result.error:
            return Outcome(BuildStatus.ERRORED, result.error)
        if result.exit_code == 0:
            return Outcome(BuildStatus.SUCCEEDED)
        where = f" in step {failed_step}" if failed_step else ""
        return Outcome(BuildStatus.FAILED, f"exit_code={result.exit_code}{where}")

    async def _wall_clock(self) -> None:
        """Backstop for the control plane's run deadline, in case it is away."""
        limit = self.a.run_timeout_seconds or 1200
        await asyncio.sleep(limit + 30)
        if self.job is not None:
            log.warning("run deadline passed without word from the control plane", extra=self.extra)
            self.timed_out = True
            await self.job.stop(self.a.kill_grace_seconds or 10)
