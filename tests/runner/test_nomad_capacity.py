"""A build Nomad has no room for yet waits, up to the startup deadline.

Nomad queues a batch job it cannot place for lack of resources: the
evaluation has ``FailedTGAllocs`` and a ``BlockedEval`` that Nomad places
once capacity frees up. The double does the same (its node has the memory
given to it; a finished allocation unblocks what now fits)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from runner.launchers.base import JobResult, JobSpec, Limits, OutputLine
from runner.launchers.nomad import NomadJob, NomadLauncher, NomadSettings
from runner.launchers.nomad_job import waits_for_capacity
from runner.metrics import RunnerMetrics
from tests.nomad_double import NomadDouble

pytestmark = pytest.mark.timeout(60)

WAITING = "conveyor_runner_nomad_capacity_waiting_builds"


@pytest.fixture
async def double(tmp_path: Path) -> AsyncIterator[NomadDouble]:
    async with NomadDouble(tmp_path / "nomad", node_memory_mb=1000) as running:
        yield running


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def launcher_for(double: NomadDouble, registry: CollectorRegistry, **changes: Any) -> NomadLauncher:
    settings = NomadSettings(
        address=double.url,
        driver="raw_exec",
        kill_timeout_seconds=5.0,
        blocking_wait_seconds=5.0,
        log_drain_seconds=0.1,
        unreachable_seconds=5.0,
    )
    return NomadLauncher(dataclasses.replace(settings, **changes), metrics=RunnerMetrics(registry))


def big(script: str) -> JobSpec:
    """A build needing most of the double's memory: two cannot run at once."""
    return JobSpec(
        build_id=uuid.uuid4().hex[:16],
        script=script,
        env={},
        limits=Limits(memory_mb=800),
    )


async def read_until(job: NomadJob, wanted: bytes, seen: list[OutputLine]) -> None:
    async for line in job.output():
        seen.append(line)
        if wanted in line.data:
            return
    raise AssertionError(f"output ended without {wanted!r}")


async def test_a_build_waits_for_capacity_then_runs(
    double: NomadDouble, registry: CollectorRegistry, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    launcher = launcher_for(double, registry)
    try:
        first = await launcher.launch(
            big(f"echo first-ready; while [ ! -e {go} ]; do sleep 0.05; done")
        )
        await read_until(first, b"first-ready", [])
        second = await launcher.launch(big("echo second-ran"))
        seen: list[OutputLine] = []
        await read_until(second, b"waiting for Nomad capacity", seen)
        waiting = registry.get_sample_value(WAITING)
        go.touch()
        _ = [line async for line in first.output()]
        seen += [line async for line in second.output()]
        results = (await first.wait(), await second.wait())
    finally:
        await launcher.close()

    assert results == (JobResult(exit_code=0), JobResult(exit_code=0))
    text = [line.data.decode() for line in seen]
    assert text[0] == (
        "nomad: waiting for Nomad capacity (resources exhausted on 1 nodes; "
        "dimension 'memory' exhausted on 1 nodes), up to 300 s"
    )
    assert any(t.startswith("nomad: placed after waiting ") for t in text)
    assert "second-ran" in text
    assert waiting == 1
    assert registry.get_sample_value(WAITING) == 0


async def test_the_wait_for_capacity_ends_at_the_startup_deadline(
    double: NomadDouble, registry: CollectorRegistry
) -> None:
    launcher = launcher_for(double, registry, startup_timeout_seconds=0.5)
    try:
        first = await launcher.launch(big("echo first-ready; sleep 60"))
        await read_until(first, b"first-ready", [])
        spec = big("echo should-not-run")
        second = await launcher.launch(spec)
        lines = [line async for line in second.output()]
        result = await second.wait()
        await first.stop(0)
    finally:
        await launcher.close()

    assert result.exit_code is None
    assert result.error == (
        "placement failed: no Nomad capacity within 0.5 s: resources exhausted on 1 nodes; "
        "dimension 'memory' exhausted on 1 nodes"
    )
    assert b"should-not-run" not in b"".join(line.data for line in lines)
    # Deregistered, so its blocked evaluation cannot run the build later.
    assert double.job(f"conveyor-build-{spec.build_id}") is None
    assert registry.get_sample_value(WAITING) == 0


async def test_a_build_waiting_for_capacity_can_be_stopped(
    double: NomadDouble, registry: CollectorRegistry
) -> None:
    launcher = launcher_for(double, registry)
    try:
        first = await launcher.launch(big("echo first-ready; sleep 60"))
        await read_until(first, b"first-ready", [])
        second = await launcher.launch(big("echo should-not-run"))
        await read_until(second, b"waiting for Nomad capacity", [])
        await second.stop(5)
        _ = [line async for line in second.output()]
        result = await second.wait()
    finally:
        await launcher.close()
    assert result == JobResult(exit_code=None, killed=True)
    assert double.running_processes() == 0


def _metric(**fields: Any) -> dict[str, Any]:
    return {"NodesEvaluated": 1, "NodesAvailable": {"dc1": 1}, **fields}


@pytest.mark.parametrize(
    ("evaluation", "waits"),
    [
        ({"FailedTGAllocs": {"build": _metric(NodesExhausted=1)}, "BlockedEval": "b"}, True),
        ({"FailedTGAllocs": {"build": _metric(QuotaExhausted=["q"])}, "BlockedEval": "b"}, True),
        (
            {
                "FailedTGAllocs": {"build": _metric(ConstraintFiltered={"${meta.gpu} = 1": 1})},
                "BlockedEval": "b",
            },
            False,
        ),
        ({"FailedTGAllocs": {"build": _metric(NodesExhausted=1)}, "BlockedEval": ""}, False),
    ],
    ids=["exhausted", "quota", "filtered", "not-blocked"],
)
def test_which_failed_placements_wait(evaluation: dict[str, Any], waits: bool) -> None:
    assert waits_for_capacity(evaluation) is waits


def test_startup_timeout_from_env() -> None:
    assert NomadSettings.from_env({}).startup_timeout_seconds == 300
    settings = NomadSettings.from_env({"CONVEYOR_NOMAD_STARTUP_TIMEOUT": "90"})
    assert settings.startup_timeout_seconds == 90
    with pytest.raises(ValueError, match="CONVEYOR_NOMAD_STARTUP_TIMEOUT"):
        NomadSettings.from_env({"CONVEYOR_NOMAD_STARTUP_TIMEOUT": "-1"})
