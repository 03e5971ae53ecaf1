"""Rate limit of failed sign-ins, per client address and overall.

In memory, per process: a guesser spreading attempts over several replicas
gets each replica's allowance, which still keeps guessing a 256-bit token
hopeless; the limit exists to keep the database and logs quiet.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class FailureThrottle:
    """Allows at most ``per_client`` failures per client and ``overall``
    failures in total within ``window`` seconds. Call ``blocked`` before
    checking a credential and ``failed`` after a wrong one."""

    def __init__(
        self,
        per_client: int = 5,
        overall: int = 100,
        window: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_client = per_client
        self.overall = overall
        self.window = window
        self.clock = clock
        self._clients: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def blocked(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        now = self.clock()
        self._expire(now)
        waits = []
        mine = self._clients.get(client)
        if mine is not None and len(mine) >= self.per_client:
            waits.append(mine[0] + self.window - now)
        if len(self._all) >= self.overall:
            waits.append(self._all[0] + self.window - now)
        return max(waits, default=0.0)

    def failed(self, client: str) -> None:
        now = self.clock()
        self._clients.setdefault(client, deque()).append(now)
        self._all.append(now)

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        while self._all and self._all[0] <= horizon:
            self._all.popleft()
        for client in [c for c, q in self._clients.items() if not q or q[-1] <= horizon]:
            del self._clients[client]
        for q in self._clients.values():
            while q and q[0] <= horizon:
                q.popleft()
