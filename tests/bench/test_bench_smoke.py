"""Smoke test of the benchmark suite: part 1 against real processes, small."""

from __future__ import annotations

from pathlib import Path

from bench import push_latency
from bench.context import Context
from bench.processes import Postgres
from bench.report import table


async def test_push_part_times_three_trivial_builds(pg_server: str, tmp_path: Path) -> None:
    work = tmp_path / "bench"
    work.mkdir()
    work.chmod(0o755)
    result = await push_latency.run(Context(work, Postgres(url=pg_server)), builds=3, warmup=1)

    assert result.raw["finished"]["n"] == 3
    by_name = {f.name: f for f in result.figures}
    initializing = by_name["push → initializing p50"].value
    running = by_name["push → running p50"].value
    finished = by_name["push → finished p50"].value
    assert initializing is not None
    assert running is not None
    assert finished is not None
    # Server timestamps of one build, in lifecycle order, after the push.
    assert 0 < initializing <= running <= finished < 60_000
    assert "push → finished p50" in table(result.figures)
