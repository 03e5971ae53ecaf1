"""ConfigService RPCs about the build fleet: runners and the queue."""

from __future__ import annotations

from control.api import convert
from control.api.edge import Ctx, principal
from control.services.registry import Services
from conveyor.v1 import config_service_pb2 as cs


class FleetRpcs:
    """Mixed into ``ConfigServicer``; needs ``self.services``."""

    services: Services

    async def ListRunners(
        self, request: cs.ListRunnersRequest, context: Ctx
    ) -> cs.ListRunnersResponse:
        runners = await self.services.runners.list(principal())
        queue = await self.services.runners.queue(principal())
        return cs.ListRunnersResponse(
            runners=[convert.runner_to_pb(r) for r in runners],
            queued=queue.queued,
            active=queue.active,
            limit=queue.limit,
        )
