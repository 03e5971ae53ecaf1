"""Log streams and task events as Nomad really produces them.

Nomad's stream framer merges reads into a frame and keeps the first read's
offset, so a frame's ``Offset`` is not where its data ends; and a task state
holds only its last 10 events. The double does both (tests/nomad_double.py:
``_Framer``, ``_MAX_EVENTS``); these tests hold the launcher to them."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from runner.launchers.base import JobResult, JobSpec, OutputLine
from runner.launchers.nomad import NomadLauncher, NomadSettings
from runner.launchers.nomad_job import EventCursor, task_started
from runner.launchers.nomad_logs import FrameDecoder, LogCursor, LogFrame, parse_frame
from tests import nomad_double
from tests.nomad_double import NomadDouble

pytestmark = pytest.mark.timeout(60)


def settings_for(double: NomadDouble) -> NomadSettings:
    return NomadSettings(
        address=double.url,
        driver="raw_exec",
        kill_timeout_seconds=5.0,
        blocking_wait_seconds=5.0,
        log_drain_seconds=0.1,
        unreachable_seconds=5.0,
    )


@pytest.fixture
async def double(tmp_path: Path) -> AsyncIterator[NomadDouble]:
    async with NomadDouble(tmp_path / "nomad", batch_seconds=0.02) as running:
        yield running


@pytest.fixture
async def launcher(double: NomadDouble) -> AsyncIterator[NomadLauncher]:
    nomad = NomadLauncher(settings_for(double))
    try:
        yield nomad
    finally:
        await nomad.close()


def spec(script: str) -> JobSpec:
    return JobSpec(build_id=uuid.uuid4().hex[:16], script=script, env={})


async def run(launcher: NomadLauncher, job_spec: JobSpec) -> tuple[list[OutputLine], JobResult]:
    job = await launcher.launch(job_spec)
    lines = [line async for line in job.output()]
    return lines, await job.wait()


def test_the_doubles_frames_are_shaped_like_nomads() -> None:
    # framer.go: reads merge, the frame keeps the first read's offset, and a
    # frame split at the size limit adds that size to it.
    framer = nomad_double._Framer(frame_bytes=10)
    framer.send("alloc/logs/t.stdout.0", "", b"abc", 3)
    framer.send("alloc/logs/t.stdout.0", "", b"defg", 7)
    framer.tick()
    framer.send("alloc/logs/t.stdout.0", "", b"0123456", 14)
    framer.send("alloc/logs/t.stdout.0", "", b"789abc", 20)
    framer.tick()
    frames = [(f["Offset"], f["Data"]) for f in framer.out]
    assert frames == [(3, b"abcdefg"), (14, b"0123456789"), (24, b"abc")]
    encoded = b"".join(nomad_double._encode_frame(f) for f in framer.out)
    assert encoded.startswith(b'{"Offset":3,"Data":"YWJjZGVmZw==","File":"alloc/logs/t.stdout.0"}{')


@pytest.mark.parametrize(("read_bytes", "frame_bytes"), [(100, 1000), (700, 1000)])
async def test_resuming_after_merged_reads_neither_repeats_nor_skips(
    launcher: NomadLauncher, double: NomadDouble, read_bytes: int, frame_bytes: int
) -> None:
    double.read_bytes = read_bytes
    double.frame_bytes = frame_bytes
    double.cut_log_streams_after = 2500
    # Bursts with pauses, so that the batch window also sends short frames.
    script = (
        'for i in $(seq 1 4000); do echo "line $i"; '
        "if [ $((i % 500)) = 0 ]; then sleep 0.05; fi; done"
    )
    lines, result = await run(launcher, spec(script))
    assert [line.data for line in lines if line.stream == "stdout"] == [
        f"line {i}".encode() for i in range(1, 4001)
    ]
    assert result == JobResult(exit_code=0)
    assert double.log_stream_cuts > 5


async def test_more_than_ten_task_events_are_all_reported(
    launcher: NomadLauncher, double: NomadDouble
) -> None:
    script = (
        "n=0; trap 'n=$((n+1)); echo \"got $n\"' USR1; echo ready; "
        'while [ "$n" -lt 12 ]; do sleep 0.02; done; echo done'
    )
    job_spec = spec(script)
    job = await launcher.launch(job_spec)
    output = job.output()
    seen: list[OutputLine] = []
    async for line in output:
        seen.append(line)
        if line.data == b"ready":
            break
    (alloc,) = double.allocations(f"conveyor-build-{job_spec.build_id}")
    url = f"{double.url}/v1/client/allocation/{alloc['ID']}/signal"
    async with aiohttp.ClientSession() as session:
        for n in range(1, 13):
            async with session.post(url, json={"Signal": "SIGUSR1", "Task": "build"}) as answer:
                assert answer.status == 200
            async for line in output:  # one signal at a time: bash would merge them
                seen.append(line)
                if line.data == f"got {n}".encode():
                    break
    seen += [line async for line in output]
    result = await job.wait()

    system = [line.data.decode() for line in seen if line.stream == "system"]
    assert system.count("nomad: Signaling: Task being sent a signal") == 12
    assert system[-1] == "nomad: Terminated: Exit Code: 0"
    assert len(double.allocations(f"conveyor-build-{job_spec.build_id}")) <= 1
    assert result == JobResult(exit_code=0)


def _alloc(*events: dict[str, Any], started_at: str = "0001-01-01T00:00:00Z") -> dict[str, Any]:
    state = {"State": "running", "StartedAt": started_at, "Events": list(events)}
    return {"ClientStatus": "running", "TaskStates": {"build": state}}


def test_a_task_whose_started_event_was_dropped_has_started() -> None:
    later = [{"Type": "Signaling", "Time": t} for t in range(10)]
    assert task_started(_alloc(*later, started_at="2026-12-02T21:00:00.5Z"))
    assert not task_started(_alloc(*later))
    assert task_started(_alloc({"Type": "Started", "Time": 1}))


def test_event_cursor_takes_each_event_once_from_a_sliding_window() -> None:
    events = [{"Type": f"e{i}", "Time": 100 + i // 2} for i in range(14)]
    cursor = EventCursor()
    assert [e["Type"] for e in cursor.take_new(_alloc(*events[:3]))] == ["e0", "e1", "e2"]
    assert cursor.take_new(_alloc(*events[:3])) == []
    # Nomad dropped the oldest: the window moved past what was seen.
    taken = cursor.take_new(_alloc(*events[4:14]))
    assert [e["Type"] for e in taken] == [f"e{i}" for i in range(4, 14)]
    # e3 shares its Time with e2, which was taken; it is new, but it fell out
    # of the window before anyone could see it, so nothing can report it.
    assert cursor.take_new(_alloc(*events[4:14])) == []


def test_events_sharing_a_time_are_told_apart() -> None:
    cursor = EventCursor()
    first = {"Type": "Signaling", "Time": 5}
    assert len(cursor.take_new(_alloc(first))) == 1
    assert len(cursor.take_new(_alloc(first, dict(first)))) == 1
    assert cursor.take_new(_alloc(first, dict(first))) == []


def test_frames_back_to_back_decode_and_carry_file_events() -> None:
    frames = [
        {"Offset": 9, "Data": base64.b64encode(b"hello\nab\n").decode(), "File": "f.0"},
        {},
        {"File": "f.0", "FileEvent": "file deleted"},
    ]
    stream = "".join(json.dumps(f, separators=(",", ":")) for f in frames).encode()
    for cut in range(len(stream)):
        decoder = FrameDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == frames
    parsed = [parse_frame(f) for f in frames]
    assert parsed == [
        LogFrame("f.0", b"hello\nab\n"),
        None,
        LogFrame("f.0", b"", "file deleted"),
    ]


def test_the_cursor_counts_data_not_offsets() -> None:
    cursor = LogCursor("build", "stdout")
    cursor.advance(LogFrame("alloc/logs/build.stdout.0", b"x" * 7))
    cursor.advance(LogFrame("alloc/logs/build.stdout.0", b"x" * 3))
    cursor.advance(LogFrame("alloc/logs/build.stdout.1", b"x" * 5))
    assert (cursor.position, cursor.received) == (15, 15)


def _listing(**sizes: int) -> list[dict[str, Any]]:
    return [
        {"Name": name.replace("_", "."), "IsDir": False, "Size": size}
        for name, size in sizes.items()
    ]


def test_rebase_counts_from_the_oldest_file_left() -> None:
    cursor = LogCursor("build", "stdout")
    for index in range(4):
        cursor.advance(LogFrame(f"alloc/logs/build.stdout.{index}", b"x" * 100))
    cursor.advance(LogFrame("alloc/logs/build.stdout.4", b"x" * 30))
    assert cursor.position == 430
    # Logmon kept two files (3 and 4); Nomad now counts offsets from file 3.
    listing = _listing(build_stdout_3=100, build_stdout_4=60, build_stderr_0=999)
    assert cursor.rebase(listing) is False
    assert cursor.position == 130
    assert cursor.rebase([]) is False  # no listing: the position stands
    assert cursor.position == 130


def test_rebase_reports_files_deleted_before_they_were_read() -> None:
    cursor = LogCursor("build", "stderr")
    cursor.advance(LogFrame("alloc/logs/build.stderr.1", b"x" * 10))
    assert cursor.rebase(_listing(build_stderr_3=100, build_stderr_4=5)) is True
    assert cursor.position == 0
    assert cursor.rebase(_listing(build_stderr_3=100, build_stderr_4=5)) is False
    fresh = LogCursor("build", "stderr")
    assert fresh.rebase(_listing(build_stderr_2=100)) is True
    assert LogCursor("build", "stderr").rebase(_listing(build_stderr_0=100)) is False


def test_a_truncated_file_is_counted_from_its_start_again() -> None:
    cursor = LogCursor("build", "stdout")
    cursor.advance(LogFrame("alloc/logs/build.stdout.1", b"x" * 40))
    assert cursor.rebase(_listing(build_stdout_0=100, build_stdout_1=40)) is False
    assert cursor.position == 140
    cursor.advance(LogFrame("alloc/logs/build.stdout.1", b"y" * 5, "file truncated"))
    cursor.advance(LogFrame("alloc/logs/build.stdout.1", b"y" * 5, "file truncated"))
    cursor.advance(LogFrame("alloc/logs/build.stdout.1", b"z" * 5))
    assert cursor.position == 115


async def test_logs_resume_exactly_after_rotated_files_were_deleted(tmp_path: Path) -> None:
    # Logmon keeps two files of 1000 bytes; every stream is cut after 700
    # bytes. The script writes each chunk only once the test has read the
    # previous one, so nothing is deleted before it was read: every loss
    # would be the launcher resuming in the wrong place.
    async with NomadDouble(tmp_path / "nomad", log_rotate_bytes=1000, batch_seconds=0.02) as double:
        double.cut_log_streams_after = 700
        nomad = NomadLauncher(dataclasses.replace(settings_for(double), log_max_files=2))
        gate = tmp_path / "gate"
        gate.mkdir()
        script = (
            "for k in $(seq 1 10); do "
            f"while [ ! -e {gate}/$k ]; do sleep 0.01; done; "
            'for i in $(seq 1 100); do echo "c$k-$i"; done; echo "chunk $k"; done'
        )
        seen: list[OutputLine] = []
        try:
            job = await nomad.launch(spec(script))
            output = job.output()
            for k in range(1, 11):
                (gate / str(k)).touch()
                try:
                    async with asyncio.timeout(10):
                        async for line in output:
                            seen.append(line)
                            if line.data == f"chunk {k}".encode():
                                break
                except TimeoutError:
                    pytest.fail(f"never read 'chunk {k}'; last: {seen[-3:]}")
            seen += [line async for line in output]
            result = await job.wait()
        finally:
            await nomad.close()
        cuts = double.log_stream_cuts
    expected = []
    for k in range(1, 11):
        expected += [f"c{k}-{i}".encode() for i in range(1, 101)] + [f"chunk {k}".encode()]
    assert [line.data for line in seen if line.stream == "stdout"] == expected
    assert not [line for line in seen if b"rotated away" in line.data]
    assert result == JobResult(exit_code=0)
    assert cuts > 3
    assert len(stdout_files(tmp_path)) == 2  # the rest were deleted


def stdout_files(root: Path) -> list[Path]:
    return list(root.glob("nomad/*/alloc/logs/build.stdout.*"))
