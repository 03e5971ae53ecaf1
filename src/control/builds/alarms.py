"""Durable deadlines: startup, run and kill alarms fired from their rows."""

from __future__ import annotations

import logging

from control.builds.deadlines import run_deadline_reason, startup_deadline_reason
from control.builds.transitions import DEFAULT_RUN_TIMEOUT, Transitions, now
from control.domain.build import BuildStatus, is_allowed
from control.metrics import ControlMetrics

log = logging.getLogger(__name__)


class Alarms:
    def __init__(self, transitions: Transitions, metrics: ControlMetrics) -> None:
        self.transitions = transitions
        self.builds = transitions.builds
        self.assignments = transitions.assignments
        self.metrics = metrics

    async def fire(self, limit: int = 100) -> int:
        """Fire due alarms (startup, run, kill deadlines); return how many
        builds ended. Firing twice is harmless: each checks the build's
        current state."""
        ended = 0
        async with self.transitions.transaction() as conn:
            for alarm in await self.builds.due_alarms(conn, limit):
                kind = alarm.kind
                await self.builds.disarm(conn, alarm.build_id, [kind])
                build = await self.builds.get_in(conn, None, alarm.build_id, lock=True)
                self.metrics.alarms_fired.labels(kind).inc()
                if build.status.final:
                    continue
                log.info("%s deadline fired", kind, extra={"build_id": build.id})
                if kind == "startup" and build.status == BuildStatus.QUEUED:
                    # Late against the alarm's own time: after an outage the
                    # reason says so (issue 16).
                    settings = self.transitions.settings
                    at = now()
                    reason = startup_deadline_reason(
                        settings.startup_deadline,
                        (at - alarm.fire_at).total_seconds(),
                        settings.alarm_poll,
                    )
                    await self.transitions.move(conn, build, BuildStatus.ERRORED, reason, at)
                    ended += 1
                    if build.runner_id:
                        # The runner may have the job after all: it must go.
                        await self.assignments.request_stop(conn, build.id, None, reason)
                        await self.transitions.nudge(conn, build.runner_id)
                elif kind == "run":
                    # The configured limit, not the time the alarm fired at:
                    # after an outage the two differ (issue 16).
                    settings = self.transitions.settings
                    configured = await self.assignments.run_timeout(conn, build.project_id)
                    limit = min(configured or DEFAULT_RUN_TIMEOUT, settings.max_run_timeout)
                    ran = (now() - (build.started_at or build.created_at)).total_seconds()
                    reason = run_deadline_reason(limit, ran - limit, settings.alarm_poll)
                    await self.transitions.stop(conn, build, BuildStatus.TIMED_OUT, reason)
                elif kind == "kill":
                    asked = build.stop_request
                    status = asked.status if asked and asked.status else BuildStatus.ERRORED
                    reason = asked.reason if asked and asked.reason else "stopped"
                    if is_allowed(build.status, status):
                        reason += " (the runner did not confirm the stop)"
                        await self.transitions.move(conn, build, status, reason, now())
                        ended += 1
        return ended
