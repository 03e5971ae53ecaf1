"""Ending tasks a caller started: cancelled *and* awaited, so none outlives
its owner or leaves an error nobody retrieved."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel each of ``tasks`` that is not done and wait until all have
    finished. Their results and errors (cancellation included) are marked
    retrieved and dropped: a caller that wants an error reads it before.

    If the caller is cancelled meanwhile, it still waits for the tasks to
    finish, then raises ``CancelledError``; the tasks must therefore honour
    cancellation promptly."""
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    interrupted = False
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            interrupted = True
    for task in tasks:
        if not task.cancelled():
            task.exception()
    if interrupted:
        raise asyncio.CancelledError
