"""Live log fan-out: followers of a build read new lines from memory.

Lines stored by this process are kept in a per-build window in memory, so 500
followers of one build cost one database write and no database reads. Lines
stored by another replica arrive as a NOTIFY wake-up; followers then read
them from PostgreSQL. Every follower re-checks the store after capturing the
watch version, so a wake-up is never lost and the switch from history to live
has no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from control.domain.build import BuildStatus
from control.errors import Unavailable
from control.storage.logs import AppendResult, LogStore, StoredLine
from control.storage.notify import Notifier

log = logging.getLogger(__name__)

WINDOW_LINES = 50_000
MESSAGE_LINES = 2_000
# Followers re-check the database at least this often even without a wake-up
# (a NOTIFY lost while the LISTEN connection was down).
RECHECK_SECONDS = 1.0

StatusReader = Callable[[str], Awaitable[BuildStatus]]


@dataclass
class _Watch:
    followers: int = 0
    version: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    window: list[StoredLine] = field(default_factory=list)
    final: BuildStatus | None = None

    def bump(self) -> None:
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()


class LogHub:
    """Owns the in-memory windows. ``ingested`` must be called after each
    committed batch of this process; ``follow`` yields batches of lines."""

    def __init__(self, store: LogStore, notifier: Notifier) -> None:
        self.store = store
        self._watches: dict[str, _Watch] = {}
        self._closed = False
        notifier.subscribe("conveyor_logs", self._on_logs)
        notifier.subscribe("conveyor_build", self._on_build)

    def close(self) -> None:
        """End every follow, now and later, with ``Unavailable``: the process
        is shutting down and viewers resume from their cursor elsewhere."""
        self._closed = True
        for each in self._watches.values():
            each.bump()

    def ingested(self, build_id: str, result: AppendResult) -> None:
        """Feed a stored batch to this build's followers, if it has any (the
        batch is decoded only then)."""
        watch = self._watches.get(build_id)
        if watch is None or not result.count:
            return
        lines = result.lines()
        window = watch.window
        if window and window[-1].number + 1 == lines[0].number:
            window.extend(lines)
            if len(window) > WINDOW_LINES:
                del window[: len(window) - WINDOW_LINES]
        else:
            watch.window = list(lines[-WINDOW_LINES:])
        watch.bump()

    def _on_logs(self, payload: str | None) -> None:
        if payload is None:
            for each in self._watches.values():
                each.bump()
        elif (watch := self._watches.get(payload)) is not None:
            watch.bump()

    def _on_build(self, payload: str | None) -> None:
        if payload is None:
            for each in self._watches.values():
                each.bump()
            return
        build_id, _, status = payload.partition(":")
        watch = self._watches.get(build_id)
        if watch is not None:
            if status and BuildStatus(status).final:
                watch.final = BuildStatus(status)
            watch.bump()

    async def read_after(self, build_id: str, after: int) -> list[StoredLine]:
        watch = self._watches.get(build_id)
        if watch and watch.window and watch.window[0].number <= after + 1:
            start = after + 1 - watch.window[0].number
            if start < len(watch.window):
                return watch.window[start : start + MESSAGE_LINES]
            if watch.window[-1].number == after:
                # The window is current unless another replica stored more.
                return []
        return await self.store.read(build_id, after, MESSAGE_LINES)

    async def follow(
        self,
        build_id: str,
        after: int,
        status_of: StatusReader,
    ) -> AsyncIterator[tuple[list[StoredLine], BuildStatus | None]]:
        """Yield (lines, None) until the build is final and every line was
        sent, then ([], final status). Cancel the iteration to stop early.
        Raises ``Unavailable`` once ``close`` was called."""
        watch = self._watches.setdefault(build_id, _Watch())
        watch.followers += 1
        # The database is asked for the status at the start and after a quiet
        # second; in between, conveyor_build notifications carry it.
        ask_status = True
        try:
            while True:
                if self._closed:
                    raise Unavailable(
                        "the control plane is shutting down; follow again from the last cursor"
                    )
                version = watch.version
                lines = await self.read_after(build_id, after)
                if lines:
                    after = lines[-1].number
                    yield lines, None
                    continue
                if watch.final is None and ask_status:
                    current = await status_of(build_id)
                    if current.final:
                        watch.final = current
                    ask_status = False
                final = watch.final
                if final is not None:
                    # The runner sends its last batch before its final report,
                    # but a batch may still be in flight from another replica.
                    rest = await self.store.read(build_id, after, MESSAGE_LINES)
                    if rest:
                        after = rest[-1].number
                        yield rest, None
                        continue
                    yield [], final
                    return
                if watch.version == version:
                    # asyncio.timeout, not wait_for: no extra task per wait,
                    # and a cancel landing as the event fires is not lost.
                    try:
                        async with asyncio.timeout(RECHECK_SECONDS):
                            await watch.changed.wait()
                    except TimeoutError:
                        ask_status = True
        finally:
            watch.followers -= 1
            if watch.followers == 0:
                self._watches.pop(build_id, None)
