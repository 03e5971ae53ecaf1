"""The build fleet and the queue as a caller sees them."""

from __future__ import annotations

from control.domain.runner import AccountQueue, RunnerInfo
from control.services.access import require
from control.storage.accounts import Principal
from control.storage.runners import RunnerStore


class RunnerService:
    """Runners are shared by every account of the installation, so any
    read-scoped caller sees them (names, labels, slots: no build of another
    account); queues are the caller's own account only."""

    def __init__(self, runners: RunnerStore) -> None:
        self.runners = runners

    async def list(self, caller: Principal) -> list[RunnerInfo]:
        """Every registered runner, connected ones first."""
        require(caller, "read")
        return await self.runners.list_all()

    async def queue(self, caller: Principal) -> AccountQueue:
        """The caller's account's queued and active builds and its limit."""
        account = require(caller, "read")
        found = await self.runners.queues(account)
        return found[0] if found else AccountQueue(account, 0, 0, 0)
