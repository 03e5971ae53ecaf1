"""Superseding goes through the checked transition like every other change:
steps closed, followers told at once, events only after the commit."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, git


async def test_a_superseded_build_has_skipped_steps_and_a_reason(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    sha = git(repo, "rev-parse", "HEAD")
    old = await api.trigger("web", branch="feature", commit_sha=sha)
    new = await api.trigger("web", branch="feature", commit_sha=sha)
    done = await api.get(old.id)
    assert done.status == pb.BUILD_STATUS_SUPERSEDED
    assert done.status_reason == f"superseded by build {new.id}"
    assert done.steps
    assert all(step.status == pb.STEP_STATUS_SKIPPED for step in done.steps)
    assert done.HasField("finished_at")
    assert (await api.get(new.id)).status == pb.BUILD_STATUS_QUEUED


async def test_a_follower_of_a_superseded_build_ends_at_once(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    sha = git(repo, "rev-parse", "HEAD")
    old = await api.trigger("web", branch="feature", commit_sha=sha)
    follower = asyncio.create_task(api.logs(old.id, follow=True))
    # The follower is waiting once the fan-out has a watch for the build.
    for _ in range(2000):
        if old.id in control.plane.hub._watches:
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("the follower never started following")
    began = time.monotonic()
    await api.trigger("web", branch="feature", commit_sha=sha)
    async with asyncio.timeout(10):
        await follower
    took = time.monotonic() - began
    # Without the build's NOTIFY the follower learns it only from its
    # one-second status poll.
    assert took < 0.5, f"the follower ended {took:.3f} s after the newer build was queued"


async def test_queue_refuses_a_connection_outside_its_transaction(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    plane = control.plane
    account = plane.admin_account_id
    project = await plane.projects.get(account, "web")
    async with plane.db.transaction() as conn:
        with pytest.raises(ValueError, match=r"Lifecycle\.transaction"):
            await plane.lifecycle.queue(
                project, branch="main", commit_sha="a" * 40, trigger="manual", conn=conn
            )
