"""What only the Nomad launcher does: the job it submits, where secrets go,
placement failures, log streams that break or rotate, KillTimeout, cleanup.
Run against the Nomad API double (tests/nomad_double.py); the behaviour every
launcher shares is in test_launcher_contract.py."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from runner.launchers.base import JobResult, JobSpec, LaunchError, Limits, OutputLine
from runner.launchers.nomad import NomadLauncher, NomadSettings
from runner.launchers.nomad_job import (
    SECRETS_TEMPLATE,
    build_job,
    placement_failure,
    task_result,
)
from runner.launchers.nomad_logs import FrameDecoder, LineSplitter
from tests import nomad_double
from tests.nomad_double import NomadDouble

pytestmark = pytest.mark.timeout(60)

SECRET = "hunter2-&-<very>-secret"


def settings_for(double: NomadDouble, **changes: Any) -> NomadSettings:
    settings = NomadSettings(
        address=double.url,
        driver="raw_exec",
        kill_timeout_seconds=5.0,
        blocking_wait_seconds=5.0,
        log_drain_seconds=0.1,
        unreachable_seconds=5.0,
    )
    return dataclasses.replace(settings, **changes)


@pytest.fixture
async def double(tmp_path: Path) -> AsyncIterator[NomadDouble]:
    async with NomadDouble(tmp_path / "nomad", node_meta={"pool": "builds"}) as running:
        yield running


@pytest.fixture
async def launcher(double: NomadDouble) -> AsyncIterator[NomadLauncher]:
    nomad = NomadLauncher(settings_for(double))
    try:
        yield nomad
    finally:
        await nomad.close()


def spec(script: str, **fields: Any) -> JobSpec:
    return JobSpec(build_id=uuid.uuid4().hex[:16], script=script, env={}, **fields)


async def run(launcher: NomadLauncher, job_spec: JobSpec) -> tuple[list[OutputLine], JobResult]:
    job = await launcher.launch(job_spec)
    lines = [line async for line in job.output()]
    return lines, await job.wait()


def stdout(lines: list[OutputLine]) -> list[bytes]:
    return [line.data for line in lines if line.stream == "stdout"]


async def read_job_over_http(double: NomadDouble, job_id: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{double.url}/v1/job/{job_id}") as response,
    ):
        return response.status, await response.text()


async def test_secret_stays_out_of_the_stored_job_and_the_logs(
    launcher: NomadLauncher, double: NomadDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    job_spec = spec(
        'echo "length ${#DEPLOY_TOKEN}"; echo ready; sleep 60',
        secret_env={"DEPLOY_TOKEN": SECRET},
    )
    job = await launcher.launch(job_spec)
    output = job.output()
    seen = []
    async for line in output:
        seen.append(line.data)
        if line.data == b"ready":
            break
    job_id = f"conveyor-build-{job_spec.build_id}"
    status, stored = await read_job_over_http(double, job_id)
    var_path = f"nomad/jobs/{job_id}"
    variable = double.variable(var_path)

    await job.stop(grace_seconds=5)
    seen += [line.data async for line in output]
    await job.wait()

    assert status == 200
    assert job_id in stored
    assert SECRET not in stored
    assert var_path in stored  # the task reads the secret from the Variable...
    assert variable is not None
    assert variable["Items"] == {"DEPLOY_TOKEN": SECRET}  # ...which holds it
    assert f"length {len(SECRET)}".encode() in seen  # and got it, without printing it
    for request in double.requests:
        if not request.path_qs.startswith(f"/v1/var/{var_path}"):
            assert SECRET.encode() not in request.body, request.path_qs
    assert SECRET not in caplog.text
    assert double.variable(var_path) is None  # deleted once the job ended
    assert double.job(job_id) is None  # purged


async def test_the_job_matches_the_build(launcher: NomadLauncher, double: NomadDouble) -> None:
    job_spec = spec(
        "echo ready; sleep 60",
        limits=Limits(memory_mb=512, cpu_mhz=700, disk_mb=900),
        labels={"pool": "builds"},
    )
    job = await launcher.launch(job_spec)
    output = job.output()
    async for line in output:
        if line.data == b"ready":
            break
    stored = double.job(f"conveyor-build-{job_spec.build_id}")
    await job.stop(grace_seconds=5)
    _ = [line async for line in output]
    await job.wait()

    assert stored is not None
    assert stored["Type"] == "batch"
    group = stored["TaskGroups"][0]
    task = group["Tasks"][0]
    assert group["RestartPolicy"] == {"Attempts": 0, "Mode": "fail"}
    assert group["ReschedulePolicy"] == {"Attempts": 0, "Unlimited": False}
    assert group["EphemeralDisk"] == {"SizeMB": 900}
    assert task["Resources"] == {"CPU": 700, "MemoryMB": 512}
    assert task["KillTimeout"] == 5_000_000_000
    assert task["Driver"] == "raw_exec"
    assert stored["Constraints"] == [
        {"LTarget": "${meta.pool}", "RTarget": "builds", "Operand": "="}
    ]


def test_build_job_for_docker_with_secrets() -> None:
    settings = NomadSettings(
        namespace="ci", region="eu", datacenters=("dc1", "dc2"), image="debian:12"
    )
    script = 'echo "{{ not a template }}" ${HOME}'
    job = build_job(
        JobSpec(
            build_id="b-42",
            script=script,
            env={"CI": "true"},
            secret_env={"TOKEN": SECRET},
            network=False,
            limits=Limits(max_processes=64, cpu_seconds=30),
            labels={"arch": "amd64"},
        ),
        settings,
    )
    assert SECRET not in json.dumps(job)
    assert job["ID"] == "conveyor-build-b-42"
    assert (job["Namespace"], job["Region"], job["Datacenters"]) == ("ci", "eu", ["dc1", "dc2"])
    task = job["TaskGroups"][0]["Tasks"][0]
    assert task["Env"] == {"CI": "true"}
    config = task["Config"]
    assert config["image"] == "debian:12"
    assert config["init"] is True
    assert config["network_mode"] == "none"
    assert config["pids_limit"] == 64
    assert config["args"][1].startswith("ulimit -t 30 ")
    script_template, secrets_template = task["Templates"]
    assert script_template["EmbeddedTmpl"] == script
    assert script_template["DestPath"] == "local/build.sh"
    assert script_template["LeftDelim"] not in script
    assert secrets_template == {
        "EmbeddedTmpl": SECRETS_TEMPLATE % "nomad/jobs/conveyor-build-b-42",
        "DestPath": "secrets/env",
        "Envvars": True,
        "ChangeMode": "noop",
    }


async def test_a_script_with_template_syntax_runs_verbatim(launcher: NomadLauncher) -> None:
    script = "cat <<'EOF'\n{{ .K }} {{ end }} ${NOMAD_TASK_DIR}\nEOF\n"
    lines, result = await run(launcher, spec(script))
    assert stdout(lines) == [b"{{ .K }} {{ end }} ${NOMAD_TASK_DIR}"]
    assert result == JobResult(exit_code=0)


def test_the_env_template_survives_nomads_env_parser() -> None:
    # toJSON would write "&" as \u0026, which go-envparse rejects.
    secret = 'a&b<c>"d"\\e\tf\ng'
    template = SECRETS_TEMPLATE % "nomad/jobs/x"
    rendered = nomad_double._render(template, "{{", "}}", lambda _path: {"S": secret})
    assert nomad_double._parse_env(rendered) == {"S": secret}
    with_to_json = template.replace("toUnescapedJSON", "toJSON")
    rendered = nomad_double._render(with_to_json, "{{", "}}", lambda _path: {"S": secret})
    with pytest.raises(ValueError, match="invalid escape sequence"):
        nomad_double._parse_env(rendered)


@pytest.mark.parametrize(
    ("secret_env", "message"),
    [
        ({"BAD NAME": "x"}, "not a valid environment variable name"),
        ({"TOKEN": "line\rfeed"}, "control character"),
    ],
)
async def test_secrets_nomad_cannot_carry_are_refused(
    launcher: NomadLauncher, double: NomadDouble, secret_env: dict[str, str], message: str
) -> None:
    with pytest.raises(LaunchError, match=message):
        await launcher.launch(spec("true", secret_env=secret_env))
    assert not any(r.method in ("PUT", "POST") for r in double.requests)


async def test_placement_failure_is_an_error_with_nomads_reason(
    launcher: NomadLauncher, double: NomadDouble
) -> None:
    job_spec = spec("echo should not run", labels={"gpu": "true"})
    lines, result = await run(launcher, job_spec)
    assert result.exit_code is None
    assert result.error is not None
    assert result.error.startswith("placement failed: ")
    assert "${meta.gpu} = true" in result.error
    assert stdout(lines) == []
    # The job is gone, so its blocked evaluation cannot run the build later.
    assert double.job(f"conveyor-build-{job_spec.build_id}") is None
    assert double.allocations(f"conveyor-build-{job_spec.build_id}") == []


async def test_a_driver_nomad_lacks_is_a_placement_failure(double: NomadDouble) -> None:
    double.drivers = ("raw_exec",)
    nomad = NomadLauncher(settings_for(double, driver="exec"))
    try:
        _lines, result = await run(nomad, spec("true"))
    finally:
        await nomad.close()
    assert result == JobResult(
        None, error="placement failed: constraint 'missing drivers': 1 nodes excluded by filter"
    )


async def test_a_driver_failure_is_an_error(double: NomadDouble) -> None:
    nomad = NomadLauncher(settings_for(double, shell_path="/nonexistent/bash"))
    try:
        lines, result = await run(nomad, spec("true"))
    finally:
        await nomad.close()
    assert result.exit_code is None
    assert result.error is not None
    assert result.error.startswith("Driver Failure: ")
    assert b"nomad: Driver Failure" in b"\n".join(line.data for line in lines)


async def test_log_stream_cut_mid_frame_resumes_without_duplicates(
    launcher: NomadLauncher, double: NomadDouble
) -> None:
    double.frame_bytes = 1000
    double.cut_log_streams_after = 4096
    script = 'for i in $(seq 1 20000); do echo "line $i"; done; echo "err $i" >&2'
    lines, result = await run(launcher, spec(script))
    assert stdout(lines) == [f"line {i}".encode() for i in range(1, 20001)]
    assert [line.data for line in lines if line.stream == "stderr"] == [b"err 20000"]
    assert result.exit_code == 0
    assert double.log_stream_cuts > 20  # the stream really was cut, many times


async def test_logs_across_rotated_files_arrive_once(tmp_path: Path) -> None:
    async with NomadDouble(tmp_path / "nomad", log_rotate_bytes=10_000) as double:
        double.cut_log_streams_after = 3000
        nomad = NomadLauncher(settings_for(double))
        try:
            lines, result = await run(nomad, spec('for i in $(seq 1 5000); do echo "l$i"; done'))
        finally:
            await nomad.close()
        cuts = double.log_stream_cuts
    assert stdout(lines) == [f"l{i}".encode() for i in range(1, 5001)]
    assert result.exit_code == 0
    assert len(rotated_files(tmp_path)) > 2
    assert cuts > 0


def rotated_files(root: Path) -> list[Path]:
    return list(root.glob("nomad/*/alloc/logs/build.stdout.*"))


async def test_nomad_kills_after_the_jobs_kill_timeout(double: NomadDouble) -> None:
    nomad = NomadLauncher(settings_for(double, kill_timeout_seconds=1.0))
    try:
        job = await nomad.launch(
            spec("trap 'echo got-term' TERM; echo ready; while true; do sleep 0.1; done")
        )
        output = job.output()
        async for line in output:
            if line.data == b"ready":
                break
        started = time.monotonic()
        await job.stop(grace_seconds=30)  # longer than KillTimeout: Nomad's SIGKILL ends it
        rest = [line.data async for line in output]
        result = await job.wait()
        elapsed = time.monotonic() - started
    finally:
        await nomad.close()
    assert b"got-term" in rest
    assert 0.9 <= elapsed < 3
    assert result.killed
    assert result.exit_code != 0


async def test_stop_before_placement_ends_the_job(
    launcher: NomadLauncher, double: NomadDouble
) -> None:
    job = await launcher.launch(spec("echo should not run; sleep 60"))
    await job.stop(grace_seconds=5)
    lines = [line async for line in job.output()]
    result = await job.wait()
    assert result.killed
    assert result.exit_code is None
    assert b"should not run" not in stdout(lines)
    assert double.running_processes() == 0


async def test_close_stops_running_jobs(double: NomadDouble) -> None:
    nomad = NomadLauncher(settings_for(double))
    job_spec = spec("echo ready; sleep 60", secret_env={"TOKEN": SECRET})
    job = await nomad.launch(job_spec)
    async for line in job.output():
        if line.data == b"ready":
            break
    await nomad.close()
    assert double.running_processes() == 0
    assert double.job(f"conveyor-build-{job_spec.build_id}") is None
    assert double.variable(f"nomad/jobs/conveyor-build-{job_spec.build_id}") is None
    with pytest.raises(LaunchError, match="closed"):
        await nomad.launch(spec("true"))


async def test_a_refused_job_is_a_launch_error_and_leaves_no_secret(double: NomadDouble) -> None:
    nomad = NomadLauncher(settings_for(double, driver="docker", image=""))
    try:
        with pytest.raises(LaunchError, match="could not register Nomad job"):
            await nomad.launch(spec("true", secret_env={"TOKEN": SECRET}))
    finally:
        await nomad.close()
    assert [r.method for r in double.requests if r.path_qs.startswith("/v1/var/")] == [
        "PUT",
        "DELETE",
    ]


async def test_an_unreachable_nomad_is_a_launch_error(tmp_path: Path) -> None:
    async with NomadDouble(tmp_path / "nomad") as double:
        url = double.url
    nomad = NomadLauncher(dataclasses.replace(NomadSettings(), address=url))
    try:
        with pytest.raises(LaunchError, match="could not register Nomad job"):
            await nomad.launch(spec("true"))
    finally:
        await nomad.close()


async def test_invalid_build_ids_are_refused(launcher: NomadLauncher) -> None:
    with pytest.raises(LaunchError, match="not usable as a Nomad job id"):
        await launcher.launch(JobSpec(build_id="a.b/c", script="true", env={}))


def test_settings_from_env() -> None:
    settings = NomadSettings.from_env(
        {
            "NOMAD_ADDR": "https://nomad.example:4646",
            "NOMAD_TOKEN": "t0ken",
            "NOMAD_NAMESPACE": "ci",
            "NOMAD_REGION": "eu",
            "NOMAD_CACERT": "/etc/nomad/ca.pem",
            "NOMAD_CLIENT_CERT": "/etc/nomad/cli.pem",
            "NOMAD_CLIENT_KEY": "/etc/nomad/cli-key.pem",
            "CONVEYOR_NOMAD_DRIVER": "exec",
            "CONVEYOR_NOMAD_DATACENTERS": "dc1, dc2",
            "CONVEYOR_NOMAD_KILL_TIMEOUT": "2.5",
        }
    )
    assert settings == NomadSettings(
        address="https://nomad.example:4646",
        token="t0ken",
        namespace="ci",
        region="eu",
        ca_cert="/etc/nomad/ca.pem",
        client_cert="/etc/nomad/cli.pem",
        client_key="/etc/nomad/cli-key.pem",
        driver="exec",
        datacenters=("dc1", "dc2"),
        kill_timeout_seconds=2.5,
    )
    assert NomadSettings.from_env({}) == NomadSettings()
    with pytest.raises(ValueError, match="CONVEYOR_NOMAD_DRIVER"):
        NomadSettings.from_env({"CONVEYOR_NOMAD_DRIVER": "podman"})
    with pytest.raises(ValueError, match="CONVEYOR_NOMAD_KILL_TIMEOUT"):
        NomadSettings.from_env({"CONVEYOR_NOMAD_KILL_TIMEOUT": "soon"})


def _alloc(
    *events: dict[str, Any], state: str = "dead", status: str = "complete"
) -> dict[str, Any]:
    return {"ClientStatus": status, "TaskStates": {"build": {"State": state, "Events": events}}}


@pytest.mark.parametrize(
    ("alloc", "stop_requested", "expected"),
    [
        (_alloc({"Type": "Started"}, state="running", status="running"), False, None),
        (
            _alloc({"Type": "Terminated", "ExitCode": 2, "Details": {"exit_code": "2"}}),
            False,
            JobResult(exit_code=2),
        ),
        (
            _alloc(
                {"Type": "Killing"},
                {"Type": "Terminated", "Details": {"exit_code": "137", "signal": "9"}},
                {"Type": "Killed"},
            ),
            True,
            JobResult(exit_code=None, killed=True),
        ),
        (
            _alloc({"Type": "Driver Failure", "DriverError": "no such image"}, status="failed"),
            False,
            JobResult(exit_code=None, error="Driver Failure: no such image"),
        ),
        (
            _alloc({"Type": "Setup Failure", "DisplayMessage": "disk full"}, status="failed"),
            False,
            JobResult(exit_code=None, error="Setup Failure: disk full"),
        ),
        (
            _alloc(
                {"Type": "Killing", "FailsTask": True, "DisplayMessage": "Template failed: x"},
                {"Type": "Killed"},
                status="failed",
            ),
            False,
            JobResult(exit_code=None, error="Killing: Template failed: x", killed=True),
        ),
        (
            _alloc({"Type": "Started"}, state="running", status="lost"),
            False,
            JobResult(None, error="allocation lost: its Nomad client stopped responding"),
        ),
    ],
)
def test_task_result(
    alloc: dict[str, Any], stop_requested: bool, expected: JobResult | None
) -> None:
    assert task_result(alloc, stop_requested=stop_requested) == expected


def test_placement_failure_words() -> None:
    evaluation = {
        "FailedTGAllocs": {
            "build": {
                "NodesEvaluated": 3,
                "NodesAvailable": {"dc1": 3},
                "ConstraintFiltered": {"${meta.gpu} = true": 2},
                "NodesExhausted": 1,
                "DimensionExhausted": {"memory": 1},
            }
        },
        "BlockedEval": "b",
    }
    assert placement_failure(evaluation) == (
        "constraint '${meta.gpu} = true': 2 nodes excluded by filter; "
        "resources exhausted on 1 nodes; dimension 'memory' exhausted on 1 nodes"
    )
    assert placement_failure({"FailedTGAllocs": None}) is None


def test_frames_split_anywhere_decode_the_same() -> None:
    frames = [
        {
            "File": "alloc/logs/build.stdout.0",
            "Offset": 6,
            "Data": base64.b64encode(b"hello\n").decode(),
        },
        {},
        {
            "File": "alloc/logs/build.stdout.0",
            "Offset": 9,
            "Data": base64.b64encode(b"ab\n").decode(),
        },
    ]
    stream = "".join(json.dumps(f) + "\n" for f in frames).encode()
    for cut in range(len(stream)):
        decoder = FrameDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == frames
        assert not decoder.pending


def test_line_splitter_keeps_partial_lines() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\nb") == [b"a"]
    assert splitter.feed(b"c\n\nd") == [b"bc", b""]
    assert splitter.flush() == b"d"
    assert splitter.flush() is None
