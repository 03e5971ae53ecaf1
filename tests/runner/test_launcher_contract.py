"""The behaviour every Launcher must have (runner.launchers.base), run against
each implementation: the local launcher, the Nomad launcher against the Nomad
API double (raw_exec driver) and, with ``-m nomad_real`` and NOMAD_ADDR set,
the Nomad launcher against a real agent (docker driver by default)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runner.launchers.base import JobResult, JobSpec, Launcher, OutputLine
from runner.launchers.nomad import NomadLauncher, NomadSettings
from tests.nomad_double import NomadDouble

pytestmark = pytest.mark.timeout(60)

# The Nomad launcher under test waits this long between SIGTERM and SIGKILL
# when its caller's grace is at least as long.
KILL_TIMEOUT = 5.0


def nomad_test_settings(double: NomadDouble) -> NomadSettings:
    """Settings for a NomadLauncher against the double, quick to notice things."""
    return NomadSettings(
        address=double.url,
        driver="raw_exec",
        kill_timeout_seconds=KILL_TIMEOUT,
        blocking_wait_seconds=5.0,
        log_drain_seconds=0.1,
        unreachable_seconds=5.0,
    )


@pytest.fixture(params=["local", "nomad", pytest.param("nomad-real", marks=pytest.mark.nomad_real)])
async def launcher(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Launcher]:
    if request.param == "local":
        try:
            from runner.launchers.local import LocalLauncher
        except ImportError as exc:
            pytest.skip(f"runner.launchers.local is not importable yet: {exc}")
        local = LocalLauncher(work_root=tmp_path)
        try:
            yield local
        finally:
            await local.close()
    elif request.param == "nomad":
        async with NomadDouble(tmp_path / "nomad") as double:
            nomad = NomadLauncher(nomad_test_settings(double))
            try:
                yield nomad
            finally:
                await nomad.close()
    else:
        if not os.environ.get("NOMAD_ADDR"):
            pytest.skip("set NOMAD_ADDR to run against a real Nomad agent")
        real = NomadLauncher(NomadSettings.from_env(os.environ))
        try:
            yield real
        finally:
            await real.close()


def spec(
    script: str,
    *,
    env: dict[str, str] | None = None,
    secret_env: dict[str, str] | None = None,
) -> JobSpec:
    return JobSpec(
        build_id=uuid.uuid4().hex[:16],
        script=script,
        env=env or {},
        secret_env=secret_env or {},
    )


async def run(launcher: Launcher, job_spec: JobSpec) -> tuple[list[OutputLine], JobResult]:
    job = await launcher.launch(job_spec)
    lines = [line async for line in job.output()]
    return lines, await job.wait()


def of(lines: list[OutputLine], stream: str) -> list[bytes]:
    return [line.data for line in lines if line.stream == stream]


async def until_stdout(output: AsyncIterator[OutputLine], wanted: bytes) -> list[OutputLine]:
    """Read ``output`` up to and including the stdout line ``wanted``."""
    seen = []
    async for line in output:
        seen.append(line)
        if line.stream == "stdout" and line.data == wanted:
            return seen
    raise AssertionError(f"output ended before {wanted!r}: {seen}")


async def test_stdout_and_stderr_arrive_in_order_on_their_streams(launcher: Launcher) -> None:
    script = "\n".join(f"echo out-{i}; echo err-{i} >&2" for i in range(50))
    lines, result = await run(launcher, spec(script))
    assert of(lines, "stdout") == [f"out-{i}".encode() for i in range(50)]
    assert of(lines, "stderr") == [f"err-{i}".encode() for i in range(50)]
    assert result == JobResult(exit_code=0)


async def test_exit_code_zero_is_reported(launcher: Launcher) -> None:
    _lines, result = await run(launcher, spec("true"))
    assert result == JobResult(exit_code=0, error=None, killed=False)


async def test_non_zero_exit_code_is_reported(launcher: Launcher) -> None:
    lines, result = await run(launcher, spec("echo about to fail; exit 3"))
    assert of(lines, "stdout") == [b"about to fail"]
    assert result == JobResult(exit_code=3, error=None, killed=False)


async def test_env_and_secret_env_reach_the_script(launcher: Launcher) -> None:
    # Characters that break naive quoting on the way through Nomad's env file.
    secret = "p&ss<w>rd \"quoted\" \\ $HOME 'single' ü"
    job_spec = spec(
        'printf "%s\\n" "$CONVEYOR_TEST_PLAIN" "$CONVEYOR_TEST_SECRET" "$CONVEYOR_TEST_MULTI"',
        env={"CONVEYOR_TEST_PLAIN": "plain value"},
        secret_env={"CONVEYOR_TEST_SECRET": secret, "CONVEYOR_TEST_MULTI": "a\tb\nc"},
    )
    lines, result = await run(launcher, job_spec)
    assert result.exit_code == 0, lines
    assert of(lines, "stdout") == [b"plain value", secret.encode(), b"a\tb", b"c"]


async def test_stop_ends_a_job_that_exits_on_sigterm_quickly(launcher: Launcher) -> None:
    job = await launcher.launch(spec("echo ready; sleep 60; echo not stopped"))
    output = job.output()
    await until_stdout(output, b"ready")
    started = time.monotonic()
    # A grace longer than the launcher's kill timeout: only SIGTERM ends it soon.
    await job.stop(grace_seconds=KILL_TIMEOUT * 2)
    rest = [line async for line in output]
    result = await job.wait()
    elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert b"not stopped" not in of(rest, "stdout")
    assert result.killed
    assert result.exit_code != 0


async def test_stop_kills_a_job_that_traps_sigterm_after_the_grace(launcher: Launcher) -> None:
    script = "trap 'echo got-term' TERM\necho ready\nwhile true; do sleep 0.1; done\n"
    job = await launcher.launch(spec(script))
    output = job.output()
    await until_stdout(output, b"ready")
    started = time.monotonic()
    await job.stop(grace_seconds=1.0)
    rest = [line async for line in output]
    result = await job.wait()
    elapsed = time.monotonic() - started
    assert b"got-term" in of(rest, "stdout")  # it was asked nicely first
    assert 0.9 <= elapsed < 4.0
    assert result.killed
    assert result.exit_code != 0


async def test_stop_after_the_end_is_harmless(launcher: Launcher) -> None:
    job = await launcher.launch(spec("echo done"))
    lines = [line async for line in job.output()]
    result = await job.wait()
    await job.stop(grace_seconds=1.0)
    await job.stop(grace_seconds=0.0)
    assert of(lines, "stdout") == [b"done"]
    assert result == JobResult(exit_code=0)
    assert await job.wait() == result


async def test_long_output_arrives_complete_and_in_order(launcher: Launcher) -> None:
    script = 'for i in $(seq 1 20000); do echo "line $i of the long output"; done'
    lines, result = await run(launcher, spec(script))
    expected = [f"line {i} of the long output".encode() for i in range(1, 20001)]
    assert of(lines, "stdout") == expected
    assert result.exit_code == 0


async def test_a_last_line_without_newline_is_delivered(launcher: Launcher) -> None:
    lines, result = await run(launcher, spec("printf 'first\\nno newline'; printf 'tail' >&2"))
    assert of(lines, "stdout") == [b"first", b"no newline"]
    assert of(lines, "stderr") == [b"tail"]
    assert result.exit_code == 0


async def test_output_bytes_are_passed_through_unchanged(launcher: Launcher) -> None:
    lines, _result = await run(launcher, spec("printf 'caf\\xc3\\xa9 \\xff\\xfe raw\\r\\n'"))
    assert of(lines, "stdout") == [b"caf\xc3\xa9 \xff\xfe raw\r"]
