"""Logs: stored exactly once and in order, resumable from a cursor, and the
switch from history to live has no gap and no duplicate."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from control.domain import cursor
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner


async def started_build(api: Api, runner: ProtocolRunner, repo: Path, name: str = "logs") -> Any:
    await api.create_project(name, repo)
    build = await api.trigger(name)
    assignment = await runner.next_assignment()
    assert assignment.build_id == build.id
    await runner.report(assignment, pb.BUILD_STATUS_INITIALIZING)
    await runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    return assignment


async def test_a_resent_batch_is_acknowledged_and_stored_once(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    a = await started_build(api, proto_runner, repo)
    first = await proto_runner.append(a, 1, ["one", "two"])
    again = await proto_runner.append(a, 1, ["one", "two"])
    second = await proto_runner.append(a, 2, ["three"])
    assert (first.last_line, first.duplicate) == (2, False)
    assert (again.last_line, again.duplicate) == (2, True)
    assert (second.last_line, second.duplicate) == (3, False)
    lines = await api.logs(a.build_id)
    assert [(ln.number, ln.text) for ln in lines] == [(1, "one"), (2, "two"), (3, "three")]


async def test_a_batch_that_skips_ahead_is_refused(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    a = await started_build(api, proto_runner, repo)
    with pytest.raises(aio.AioRpcError) as err:
        await proto_runner.append(a, 2, ["too early"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "next expected is 1" in (err.value.details() or "")
    assert await api.logs(a.build_id) == []


async def test_stream_resumes_exactly_after_the_cursor(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    a = await started_build(api, proto_runner, repo)
    await proto_runner.append(a, 1, [f"line {i}" for i in range(1, 11)])
    for after in (0, 1, 5, 9, 10):
        lines = await api.logs(a.build_id, cursor=cursor.encode(after) if after else "")
        assert [ln.number for ln in lines] == list(range(after + 1, 11))


async def test_long_lines_are_cut_with_a_marker_and_nul_is_replaced(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    a = await started_build(api, proto_runner, repo)
    await proto_runner.append(a, 1, ["x" * 100_000, "nul\0byte"])
    lines = await api.logs(a.build_id)
    assert lines[0].text.endswith("[conveyor: line cut at 65536 bytes]")
    assert len(lines[0].text.encode()) < 66_000
    assert lines[1].text == "nul\ufffdbyte"


async def test_many_tails_racing_many_appends_see_exactly_the_stored_log(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    a = await started_build(api, proto_runner, repo)
    batches = 120
    rng = random.Random(7)

    async def writer() -> None:
        for seq in range(1, batches + 1):
            size = rng.randint(1, 40)
            await proto_runner.append(a, seq, [f"b{seq}-{i}" for i in range(size)])
            if seq % 10 == 0:
                await asyncio.sleep(0.005)
        await proto_runner.report(a, pb.BUILD_STATUS_SUCCEEDED)

    async def tail(start_delay: float, resume_at: int) -> list[tuple[int, str]]:
        await asyncio.sleep(start_delay)
        seen: list[tuple[int, str]] = []
        start = cursor.encode(resume_at) if resume_at else ""
        for line in await api.logs(a.build_id, follow=True, cursor=start):
            seen.append((line.number, line.text))
        return seen

    tails = [tail(rng.uniform(0, 0.3), rng.choice([0, 0, 0, 3, 17])) for _ in range(24)]
    results = await asyncio.gather(writer(), *tails)
    stored = [(ln.number, ln.text) for ln in await api.logs(a.build_id)]
    assert [n for n, _ in stored] == list(range(1, len(stored) + 1))
    for seen in results[1:]:
        assert seen, "a tail saw nothing"
        first = seen[0][0]
        assert seen == stored[first - 1 :], "a tail has a gap or a duplicate"


async def test_build_tokens_write_only_to_their_own_build_and_die_with_it(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    a = await started_build(api, proto_runner, repo, "one")
    await api.create_project("two", repo)
    await api.trigger("two")
    b = await proto_runner.next_assignment()
    forged = type(a)()
    forged.CopyFrom(a)
    forged.build_token = b.build_token
    with pytest.raises(aio.AioRpcError) as err:
        await proto_runner.append(forged, 1, ["not mine"])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await proto_runner.report(a, pb.BUILD_STATUS_SUCCEEDED)
    with pytest.raises(aio.AioRpcError) as err:
        await proto_runner.append(a, 1, ["after the end"])
    # A dead token is no credential: refused before the request is read.
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await api.logs(a.build_id) == []
