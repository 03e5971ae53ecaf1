"""SchedulerService: nudge the scheduler, and show the queue."""

from __future__ import annotations

from control.api.edge import Ctx, account_of_caller, principal
from control.scheduler.loop import Scheduler
from control.storage.db import Database
from conveyor.v1 import scheduler_service_pb2 as ss
from conveyor.v1 import scheduler_service_pb2_grpc as ss_grpc


class SchedulerServicer(ss_grpc.SchedulerServiceServicer):
    def __init__(self, scheduler: Scheduler, db: Database, runner_alive: float) -> None:
        self.scheduler = scheduler
        self.db = db
        self.runner_alive = runner_alive

    async def Wake(self, request: ss.WakeRequest, context: Ctx) -> ss.WakeResponse:
        self.scheduler.wake()
        return ss.WakeResponse()

    async def GetQueue(self, request: ss.GetQueueRequest, context: Ctx) -> ss.GetQueueResponse:
        """Queue depth of the caller's account; only the control plane's own
        credential sees every account (a tenant's admin is still a tenant)."""
        only = None if principal().kind == "internal" else account_of_caller()
        runners = self.scheduler.runners
        queues = await runners.queues(only)
        async with self.db.connection() as conn:
            capacity, busy = await runners.free_slots(conn, self.runner_alive)
        return ss.GetQueueResponse(
            accounts=[
                ss.AccountQueue(
                    account_id=q.account_id, limit=q.limit, queued=q.queued, active=q.active
                )
                for q in queues
            ],
            free_slots=max(capacity - busy, 0),
        )
