"""Scheduling against real control planes and runners speaking the real
protocol: account limits, global capacity, fairness, several scheduler
replicas on one database, cancel-in-progress, and builds coming back to the
queue from a runner that never started them."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio

from control.domain.project import Project, ProjectSettings
from control.main import ControlPlane
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner

pytestmark = pytest.mark.timeout(90)


@contextlib.asynccontextmanager
async def live_runner(
    control: ControlHandle, capacity: int, name: str = "proto", runner_uuid: str = ""
) -> AsyncIterator[ProtocolRunner]:
    """A ProtocolRunner that heartbeats, so the reaper leaves it alone."""
    runner = ProtocolRunner(
        control.plane.grpc_address, control.runner_token, capacity=capacity, name=name
    )
    if runner_uuid:
        runner.runner_uuid = runner_uuid
    await runner.start()

    async def beat() -> None:
        while True:
            runner.heartbeat()
            await asyncio.sleep(0.5)

    task = asyncio.create_task(beat())
    try:
        yield runner
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.close()


async def make_account(control: ControlHandle, name: str, limit: int | None = None) -> str:
    account_id = str(uuid.uuid4())
    async with control.plane.db.connection() as conn:
        if limit is None:
            await conn.execute(
                "INSERT INTO accounts (id, name) VALUES (%s, %s)", (account_id, name)
            )
        else:
            await conn.execute(
                "INSERT INTO accounts (id, name, concurrency_limit) VALUES (%s, %s, %s)",
                (account_id, name, limit),
            )
    return account_id


async def make_project(control: ControlHandle, account_id: str, name: str) -> Project:
    async with control.plane.db.transaction() as conn:
        return await control.plane.projects.create(
            conn,
            account_id,
            ProjectSettings(name=name, repo_url="/nonexistent/repo", build_command="true"),
        )


async def backlog(control: ControlHandle, project: Project, count: int) -> list[str]:
    """Queue ``count`` builds at once (one INSERT), oldest first, each on its
    own branch; return their ids oldest first."""
    async with control.plane.db.transaction() as conn:
        cur = await conn.execute(
            "INSERT INTO builds (id, project_id, account_id, branch, commit_sha, status,"
            " trigger, production, created_at)"
            " SELECT gen_random_uuid(), %s, %s, 'b' || g, repeat('a', 40), 'queued', 'manual',"
            " false, now() - make_interval(secs => 100000 - g) FROM generate_series(1, %s) g"
            " RETURNING id, created_at",
            (project.id, project.account_id, count),
        )
        rows = sorted(await cur.fetchall(), key=lambda r: r[1])
        await conn.execute(
            "INSERT INTO build_steps (build_id, idx, name)"
            " SELECT id, 0, 'clone' FROM builds WHERE project_id = %s",
            (project.id,),
        )
        await conn.execute("SELECT pg_notify('conveyor_queue', '')")
    return [str(r[0]) for r in rows]


async def queue_one(control: ControlHandle, project: Project, branch: str = "main") -> str:
    return await control.plane.lifecycle.queue(
        project, branch=branch, commit_sha="b" * 40, trigger="manual"
    )


async def finish(runner: ProtocolRunner, assignment: Any) -> None:
    await runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    await runner.report(assignment, pb.BUILD_STATUS_SUCCEEDED)


async def no_assignment(control: ControlHandle, runner: ProtocolRunner, passes: int = 2) -> None:
    """Assert that the scheduler completed ``passes`` more passes and the
    runner got nothing: proof that the scheduler looked and chose not to,
    rather than a guess at how long choosing takes. The short wait at the
    end covers an assignment already on its way to the runner's stream."""
    ticks = control.plane.metrics.scheduler_tick_seconds
    start = _count(ticks)
    async with asyncio.timeout(30):
        while True:  # polled: the scheduler has no event to wait on
            if _count(ticks) >= start + passes:
                break
            await asyncio.sleep(0.01)
    with contextlib.suppress(TimeoutError):
        extra = await runner.next_assignment(timeout=0.2)
        raise AssertionError(f"unexpected assignment of build {extra.build_id}")


def _count(histogram: Any) -> float:
    """Observations of an unlabelled prometheus-client histogram."""
    return float(sum(bucket.get() for bucket in histogram._buckets))


@pytest.mark.timing  # one scheduler tick (1 s) with a 1,000-build backlog
async def test_account_limit_fifo_and_a_single_build_beside_a_backlog(
    control: ControlHandle,
) -> None:
    busy = await make_account(control, "busy")  # default limit: 6
    quiet = await make_account(control, "quiet")
    waiting = await backlog(control, await make_project(control, busy, "big"), 1000)
    single_project = await make_project(control, quiet, "small")
    async with live_runner(control, capacity=8) as runner:
        first = [await runner.next_assignment() for _ in range(6)]
        # The default limit holds "busy" at 6 with 2 slots idle; the oldest
        # six start (started together, they may arrive in any order).
        assert sorted(a.build_id for a in first) == sorted(waiting[:6])
        # Started together, none of them lost the race for the runner's row.
        decisions = control.plane.metrics.scheduler_decisions
        assert decisions.labels("no_runner")._value.get() == 0
        await no_assignment(control, runner)

        # The other account's single build starts within one tick of the
        # default 1 s (this control plane's faster tick is for the rest of
        # the test; a loaded CI machine can take more than 0.5 s).
        began = time.monotonic()
        single = await queue_one(control, single_project)
        got = await runner.next_assignment(timeout=5)
        took = time.monotonic() - began
        assert got.build_id == single
        assert took < 1.0, f"the single build waited {took:.2f} s behind a backlog"

        # A freed slot of "busy" goes to its next oldest build.
        await finish(runner, first[0])
        assert (await runner.next_assignment()).build_id == waiting[6]


async def test_a_freed_slot_goes_to_the_account_with_fewer_active_builds(
    control: ControlHandle,
) -> None:
    busy = await make_account(control, "busy", limit=10)
    quiet = await make_account(control, "quiet")
    waiting = await backlog(control, await make_project(control, busy, "big"), 1000)
    async with live_runner(control, capacity=3) as runner:
        first = [await runner.next_assignment() for _ in range(3)]
        assert sorted(a.build_id for a in first) == sorted(waiting[:3])
        # The runner is full; a build of the other account waits for a slot.
        single = await queue_one(control, await make_project(control, quiet, "small"))
        await no_assignment(control, runner)
        began = time.monotonic()
        await finish(runner, first[0])
        got = await runner.next_assignment(timeout=5)
        took = time.monotonic() - began
        assert got.build_id == single, "the backlog took the freed slot"
        assert took < control.settings.scheduler_tick


async def metric_samples(http_url: str, name: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"{http_url}/metrics") as reply:
        text = await reply.text()
    samples = {}
    for labels, value in re.findall(rf'^{name}\{{account_id="([^"]*)"\}} (\S+)$', text, re.M):
        samples[labels] = float(value)
    return samples


async def test_queue_depth_of_an_account_whose_queue_emptied_is_not_stale(
    control: ControlHandle,
) -> None:
    account = await make_account(control, "depth")
    project = await make_project(control, account, "depth")
    for branch in ("one", "two", "three"):
        await queue_one(control, project, branch)
    depth = await metric_samples(control.http_url, "conveyor_queue_depth")
    assert depth.get(account) == 3
    async with live_runner(control, capacity=4) as runner:
        for _ in range(3):
            await runner.next_assignment()
        depth = await metric_samples(control.http_url, "conveyor_queue_depth")
        assert depth.get(account, 0) == 0


@pytest.fixture
async def capped(database_url: str) -> AsyncIterator[ControlHandle]:
    handle = ControlHandle(database_url)
    handle.settings = handle.settings.with_(global_capacity=3)
    handle.plane = ControlPlane(handle.settings)
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


async def test_global_capacity_bounds_all_accounts_together(capped: ControlHandle) -> None:
    a = await make_account(capped, "a", limit=2)
    b = await make_account(capped, "b")
    from_a = await backlog(capped, await make_project(capped, a, "pa"), 5)
    from_b = await backlog(capped, await make_project(capped, b, "pb"), 5)
    async with live_runner(capped, 4, "r1") as r1, live_runner(capped, 4, "r2") as r2:
        runners = [r1, r2]
        got: list[tuple[ProtocolRunner, Any]] = []
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            for r in runners:
                while not r.assignments.empty():
                    got.append((r, r.assignments.get_nowait()))
            await asyncio.sleep(0.02)
        assert len(got) == 3
        ids = [a.build_id for _, a in got]
        # Both accounts are served; "a" is within its limit of 2.
        assert sum(i in from_a for i in ids) <= 2
        assert any(i in from_b for i in ids)
        for r in runners:
            await no_assignment(capped, r, passes=1)
        # One ends: exactly one more starts.
        runner, assignment = got[0]
        await finish(runner, assignment)
        more = []
        deadline = time.monotonic() + 5
        while not more and time.monotonic() < deadline:
            for r in runners:
                while not r.assignments.empty():
                    more.append(r.assignments.get_nowait())
            await asyncio.sleep(0.02)
        assert len(more) == 1
        for r in runners:
            await no_assignment(capped, r, passes=1)


async def test_two_scheduler_replicas_hand_out_each_build_exactly_once(
    database_url: str,
) -> None:
    replicas = [ControlHandle(database_url), ControlHandle(database_url)]
    for replica in replicas:
        await replica.start()
    try:
        one = replicas[0]
        async with one.plane.db.connection() as conn:
            await conn.execute("UPDATE accounts SET concurrency_limit = 100")
        project = await make_project(one, one.plane.admin_account_id, "many")
        total, capacity = 80, 3
        assigned: list[str] = []
        over_capacity: list[str] = []
        rng = random.Random(3)

        async def work(runner: ProtocolRunner) -> None:
            active: set[str] = set()

            async def run_one(a: Any) -> None:
                await runner.report(a, pb.BUILD_STATUS_RUNNING)
                await asyncio.sleep(rng.uniform(0, 0.05))
                await runner.append(a, 1, [f"built {a.build_id}"])
                await runner.report(a, pb.BUILD_STATUS_SUCCEEDED)
                active.discard(a.build_id)

            tasks = []
            while True:
                a = await runner.assignments.get()
                assigned.append(a.build_id)
                active.add(a.build_id)
                if len(active) > capacity:
                    over_capacity.append(runner.name)
                tasks.append(asyncio.create_task(run_one(a)))

        async with contextlib.AsyncExitStack() as stack:
            runners = [
                await stack.enter_async_context(live_runner(replicas[i % 2], capacity, f"r{i}"))
                for i in range(4)
            ]
            workers = [asyncio.create_task(work(r)) for r in runners]
            # Builds arrive through both replicas while both schedule.
            ids = []
            for i in range(total):
                replica = replicas[i % 2]
                ids.append(await queue_one(replica, project, f"branch-{i}"))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                async with one.plane.db.connection() as conn:
                    cur = await conn.execute(
                        "SELECT count(*) FROM builds WHERE status = 'succeeded'"
                    )
                    row = await cur.fetchone()
                if row and row[0] == total:
                    break
                await asyncio.sleep(0.05)
            for w in workers:
                w.cancel()
        twice = [b for b, n in Counter(assigned).items() if n > 1]
        assert not twice, f"builds handed out twice: {twice}"
        assert sorted(assigned) == sorted(ids)
        assert not over_capacity, f"runners over capacity: {over_capacity}"
    finally:
        for replica in reversed(replicas):
            await replica.stop()


async def test_cancel_in_progress_stops_the_branch_s_running_build(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("cip", repo, cancel_in_progress=True)
    async with live_runner(control, capacity=4) as runner:
        first = await api.trigger("cip")
        a1 = await runner.next_assignment()
        assert a1.build_id == first.id
        await runner.report(a1, pb.BUILD_STATUS_RUNNING)
        second = await api.trigger("cip")
        stop = await asyncio.wait_for(runner.cancels.get(), 5)
        assert stop.build_id == first.id
        assert second.id in stop.reason
        # The job stopped as asked: the build ends canceled, not failed.
        await runner.report(a1, pb.BUILD_STATUS_FAILED, reason="exit_code=143")
        done = await api.get(first.id)
        assert done.status == pb.BUILD_STATUS_CANCELED
        assert done.status_reason == f"canceled: superseded by build {second.id}"
        a2 = await runner.next_assignment()
        assert a2.build_id == second.id


async def test_without_cancel_in_progress_the_running_build_goes_on(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("keep", repo)
    async with live_runner(control, capacity=4) as runner:
        first = await api.trigger("keep")
        a1 = await runner.next_assignment()
        await runner.report(a1, pb.BUILD_STATUS_RUNNING)
        second = await api.trigger("keep")
        assert (await runner.next_assignment()).build_id == second.id
        assert runner.cancels.empty()
        assert (await api.get(first.id)).status == pb.BUILD_STATUS_RUNNING


@pytest.fixture
async def quick_lost(database_url: str) -> AsyncIterator[ControlHandle]:
    handle = ControlHandle(database_url, runner_lost_after=2.0, startup_deadline=60.0)
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


async def test_a_build_a_lost_runner_accepted_but_never_started_goes_to_another(
    quick_lost: ControlHandle, repo: Path
) -> None:
    control = quick_lost
    api = Api(control.plane.grpc_address, control.admin_token)
    doomed = ProtocolRunner(control.plane.grpc_address, control.runner_token, name="doomed")
    await doomed.start()
    try:
        await api.create_project("handover", repo)
        build = await api.trigger("handover")
        taken = await doomed.next_assignment()  # acknowledged, never reported
        async with live_runner(control, capacity=2, name="rescuer") as rescuer:
            await doomed.close()
            began = time.monotonic()
            again = await rescuer.next_assignment(timeout=10)
            took = time.monotonic() - began
            assert again.build_id == build.id
            assert again.build_token != taken.build_token
            assert took < 2.0 + 2.0, f"handover took {took:.2f} s"
            # Meanwhile the build was never errored, and the old token is dead.
            assert (await api.get(build.id)).status == pb.BUILD_STATUS_QUEUED
            with pytest.raises(aio.AioRpcError) as err:
                await rescuer.report(taken, pb.BUILD_STATUS_RUNNING)
            # Refused at the edge, before the request is read: a dead token
            # is no credential at all.
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await finish(rescuer, again)
        assert (await api.get(build.id)).status == pb.BUILD_STATUS_SUCCEEDED
    finally:
        await doomed.close()
        await api.close()


async def test_a_runner_back_without_an_assignment_gets_it_again(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    """The assignment was lost with the stream: the runner's hello does not
    list it, so the build goes back to the queue instead of erroring."""
    await api.create_project("lostmsg", repo)
    runner_uuid = str(uuid.uuid4())
    async with live_runner(control, capacity=2, runner_uuid=runner_uuid) as first:
        build = await api.trigger("lostmsg")
        taken = await first.next_assignment()
    async with live_runner(control, capacity=2, runner_uuid=runner_uuid) as back:
        again = await back.next_assignment()
        assert again.build_id == build.id == taken.build_id
        await finish(back, again)
    assert (await api.get(build.id)).status == pb.BUILD_STATUS_SUCCEEDED


async def reconnect(control: ControlHandle, runner_uuid: str, running: list[str]) -> ProtocolRunner:
    """The same runner back on a new stream, saying it still runs ``running``."""
    back = ProtocolRunner(control.plane.grpc_address, control.runner_token, capacity=2)
    back.runner_uuid = runner_uuid
    hello = back.rs.RunnerHello(
        runner_id=runner_uuid, name="back", capacity=2, running_build_ids=running
    )
    # Queued before the hello that start() sends: only the first one counts.
    back.outbox.put_nowait(back.rs.ConnectRequest(hello=hello))
    await back.start()
    return back


async def test_a_stop_lost_with_the_stream_is_sent_again_on_reconnect(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("resend", repo)
    runner_uuid = str(uuid.uuid4())
    async with live_runner(control, capacity=2, runner_uuid=runner_uuid) as first:
        build = await api.trigger("resend")
        a = await first.next_assignment()
        await first.report(a, pb.BUILD_STATUS_RUNNING)
        await api.cancel(build.id)
        # Sent on this stream; the runner goes away before acting on it.
        assert (await asyncio.wait_for(first.cancels.get(), 5)).build_id == build.id
    back = await reconnect(control, runner_uuid, [build.id])
    try:
        stop = await asyncio.wait_for(back.cancels.get(), 5)
        assert stop.build_id == build.id
        await back.report(a, pb.BUILD_STATUS_CANCELED)
        assert (await api.get(build.id)).status == pb.BUILD_STATUS_CANCELED
    finally:
        await back.close()


async def test_a_build_that_ended_while_its_runner_was_away_is_stopped_there(
    quick_lost: ControlHandle, repo: Path
) -> None:
    control = quick_lost
    api = Api(control.plane.grpc_address, control.admin_token)
    runner_uuid = str(uuid.uuid4())
    try:
        await api.create_project("partition", repo)
        async with live_runner(control, capacity=2, runner_uuid=runner_uuid) as first:
            build = await api.trigger("partition")
            a = await first.next_assignment()
            await first.report(a, pb.BUILD_STATUS_RUNNING)
        # Silent past the bound: declared lost, its build errored.
        done = await api.wait_status(build.id, timeout=10)
        assert done.status == pb.BUILD_STATUS_ERRORED
        back = await reconnect(control, runner_uuid, [build.id])
        try:
            stop = await asyncio.wait_for(back.cancels.get(), 5)
            assert stop.build_id == build.id
            assert stop.reason == "the build already ended"
        finally:
            await back.close()
    finally:
        await api.close()


async def test_a_canceled_build_of_a_lost_runner_ends_canceled_instead_of_running_again(
    quick_lost: ControlHandle, repo: Path
) -> None:
    control = quick_lost
    api = Api(control.plane.grpc_address, control.admin_token)
    doomed = ProtocolRunner(control.plane.grpc_address, control.runner_token, name="doomed")
    await doomed.start()
    try:
        await api.create_project("nevermind", repo)
        build = await api.trigger("nevermind")
        await doomed.next_assignment()  # acknowledged, never started
        async with live_runner(control, capacity=2, name="rescuer") as rescuer:
            await api.cancel(build.id)
            await doomed.close()  # gone before it could act on the stop
            done = await api.wait_status(build.id, timeout=10)
            assert done.status == pb.BUILD_STATUS_CANCELED
            assert done.status_reason == "canceled by admin"
            assert rescuer.assignments.empty()
    finally:
        await doomed.close()
        await api.close()
