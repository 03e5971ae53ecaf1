"""Which queued builds may start now. Pure: no I/O.

FIFO within an account, round-robin across accounts, each account bounded by
its concurrency limit and everything by the free slots. Accounts with fewer
active builds go first, so one account's backlog never delays another
account's single build.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AccountQueue:
    account_id: str
    limit: int
    active: int
    # Oldest first; at most ``limit`` entries are needed.
    queued: tuple[str, ...]


def pick(accounts: list[AccountQueue], free_slots: int) -> list[str]:
    """Return build ids to start, in the order to start them."""
    order = sorted(
        (a for a in accounts if a.queued and a.active < a.limit),
        key=lambda a: (a.active, a.account_id),
    )
    room = {a.account_id: a.limit - a.active for a in order}
    cursor = {a.account_id: 0 for a in order}
    chosen: list[str] = []
    while len(chosen) < free_slots:
        progressed = False
        for account in order:
            if len(chosen) >= free_slots:
                break
            i = cursor[account.account_id]
            if room[account.account_id] > 0 and i < len(account.queued):
                chosen.append(account.queued[i])
                cursor[account.account_id] = i + 1
                room[account.account_id] -= 1
                progressed = True
        if not progressed:
            break
    return chosen
