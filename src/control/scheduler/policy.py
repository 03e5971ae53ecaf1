"""Which queued builds may start now. Pure: no I/O.

FIFO within an account; across accounts, max-min fair: the next slot always
goes to the account with the fewest builds active (counting the ones this
pick has already given it), ties broken by whose next build has waited
longest. Each account is bounded by its concurrency limit and everything by
the free slots, so one account's backlog never delays another account's
single build: that build's account has fewer active builds and goes first.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class QueuedBuild:
    build_id: str
    queued_at: datetime


@dataclass(frozen=True)
class AccountQueue:
    """One account's view for a pick. ``active`` counts builds holding a
    slot (handed to a runner, initializing or running); ``queued`` is the
    account's waiting builds, oldest first (only the first ``limit`` matter)."""

    account_id: str
    limit: int
    active: int
    queued: tuple[QueuedBuild, ...]


def pick(accounts: list[AccountQueue], free_slots: int) -> list[str]:
    """Return the ids of the builds to start, in the order to start them.

    Never more than ``free_slots`` (a negative number means none), never more
    for an account than ``limit - active``, always a prefix of each account's
    queue, and as many as those bounds allow (no slot is left idle while an
    eligible build waits).
    """
    # Heap entries: (level, head's queued_at, account id, index into accounts).
    heap: list[tuple[int, datetime, str, int]] = []
    for i, account in enumerate(accounts):
        if account.queued and account.active < account.limit:
            heap.append((account.active, account.queued[0].queued_at, account.account_id, i))
    heapq.heapify(heap)
    taken = [0] * len(accounts)
    chosen: list[str] = []
    while heap and len(chosen) < free_slots:
        level, _since, account_id, i = heapq.heappop(heap)
        account = accounts[i]
        chosen.append(account.queued[taken[i]].build_id)
        taken[i] += 1
        if taken[i] < len(account.queued) and account.active + taken[i] < account.limit:
            nxt = account.queued[taken[i]].queued_at
            heapq.heappush(heap, (level + 1, nxt, account_id, i))
    return chosen
