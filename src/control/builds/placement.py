"""Placement: queued builds onto live runners' free slots, least busy first."""

from __future__ import annotations

from datetime import timedelta

from control.builds.transitions import Transitions, now
from control.config import LifecycleSettings
from control.domain.build import BuildStatus
from control.errors import FailedPrecondition
from control.storage.runners import RunnerStore


class Placement:
    def __init__(
        self, transitions: Transitions, runners: RunnerStore, settings: LifecycleSettings
    ) -> None:
        self.transitions = transitions
        self.builds = transitions.builds
        self.assignments = transitions.assignments
        self.runners = runners
        self.settings = settings

    async def place(self, build_ids: list[str]) -> dict[str, str]:
        """Hand queued builds to live runners with free slots, least busy
        first, oldest build first, in one transaction; return {build id:
        runner id} for those placed. Builds no longer queued, already
        handed out, or locked by a concurrent placement are left out; so
        are builds past the free slots. Each placed build gets a startup
        alarm, and each runner one NOTIFY."""
        placed: dict[str, str] = {}
        async with self.transitions.transaction() as conn:
            queued = await self.assignments.lock_placeable(conn, build_ids)
            if not queued:
                return placed
            # Runners are locked in id order, so two placements never
            # deadlock, and their free slots counted once the locks are held.
            free = await self.runners.lock_free(conn, self.settings.runner_lost_after)
            for build_id in queued:
                if not free:
                    break
                runner_id = max(free, key=lambda r: free[r])
                placed[build_id] = runner_id
                free[runner_id] -= 1
                if free[runner_id] == 0:
                    del free[runner_id]
            if not placed:
                return placed
            startup_by = now() + timedelta(seconds=self.settings.startup_deadline)
            await self.assignments.assign(conn, placed, startup_by)
            for runner_id in sorted(set(placed.values())):
                await self.transitions.nudge(conn, runner_id)
        return placed

    async def place_one(self, build_id: str) -> str | None:
        """Place one build; return its runner, or None when no runner has a
        free slot. Idempotent: a build already handed out returns its
        runner. Raises ``NotFound`` for an unknown build and
        ``FailedPrecondition`` for one that is no longer queued."""
        placed = await self.place([build_id])
        if build_id in placed:
            return placed[build_id]
        build = await self.builds.get(None, build_id)
        if build.status != BuildStatus.QUEUED:
            raise FailedPrecondition(f"build is {build.status.value}; only a queued build starts")
        return build.runner_id
