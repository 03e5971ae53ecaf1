"""common/tasks.py: a task that is cancelled is also awaited."""

from __future__ import annotations

import asyncio
import gc

import pytest

from common.tasks import cancel_and_wait


async def test_every_task_has_finished_when_it_returns() -> None:
    cleaned = asyncio.Event()

    async def holds_a_resource() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself awaits
            cleaned.set()

    task = asyncio.create_task(holds_a_resource())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()
    assert cleaned.is_set()


async def test_errors_of_finished_tasks_are_retrieved_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    # Not task.exception() here: that would retrieve the error itself.
    assert task.done()
    assert not task.cancelled()
    del task
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_the_callers_cancellation_waits_for_the_tasks_then_propagates() -> None:
    release = asyncio.Event()
    finished = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()
            finished.set()

    child = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    owner = asyncio.create_task(cancel_and_wait(child))
    await asyncio.sleep(0)
    owner.cancel()
    await asyncio.sleep(0.01)
    assert not owner.done()  # still waiting for the child's cleanup
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await owner
    assert finished.is_set()
