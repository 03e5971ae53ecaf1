"""Runners as the dashboard and ``conveyor runners list`` show them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class RunnerInfo:
    """One registered runner. ``busy`` counts the builds holding a slot;
    ``draining`` is a connected runner that takes no new builds."""

    id: str
    name: str
    labels: list[str]
    launcher: str
    capacity: int
    busy: int
    connected: bool
    draining: bool
    connected_at: datetime | None
    last_seen_at: datetime
    # The isolation it gives builds ("bubblewrap", "none", "nomad"), as it
    # said at its last connect; "" for a runner too old to say.
    sandbox: str = ""


@dataclass(frozen=True)
class AccountQueue:
    """An account's builds waiting for a slot (``queued``) and holding one
    (``active``), against its concurrency ``limit``."""

    account_id: str
    limit: int
    queued: int
    active: int
