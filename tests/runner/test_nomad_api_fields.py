"""The jobs the launcher submits use only Nomad's own field names.

Nomad decodes a job with Go's encoding/json, which drops a key it has no
field for without an error: a misspelled ``Envvars`` left every secret unset
while the build still ran. The double refuses such keys instead; its
allow-list (``tests/nomad_double.py``, ``_API_STRUCTS``) is copied from
hashicorp/nomad's api package."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from runner.launchers.base import JobSpec, Limits
from runner.launchers.nomad_job import NomadSettings, build_job
from tests.nomad_double import NomadDouble, check_driver_config, check_fields

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "settings",
    [
        NomadSettings(namespace="ci", region="eu", datacenters=("dc1",), image="debian:12"),
        NomadSettings(driver="exec"),
        NomadSettings(driver="raw_exec"),
    ],
    ids=["docker", "exec", "raw_exec"],
)
def test_every_field_of_the_job_is_one_nomad_has(settings: NomadSettings) -> None:
    spec = JobSpec(
        build_id="b-1",
        script="echo hi",
        env={"CI": "true"},
        secret_env={"TOKEN": "s3cret"},
        network=False,
        local_paths=("/srv/repo",),
        limits=Limits(memory_mb=512, cpu_mhz=700, disk_mb=900, cpu_seconds=30),
        labels={"pool": "builds"},
    )
    job = build_job(spec, settings)
    check_fields({"Job": job}, "JobRegisterRequest")
    task = job["TaskGroups"][0]["Tasks"][0]
    check_driver_config(task["Driver"], task["Config"])
    secrets = job["TaskGroups"][0]["Tasks"][0]["Templates"][1]
    assert secrets["Envvars"] is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t["Templates"][0].update(Envvar=True),
            "Job.TaskGroups[0].Tasks[0].Templates[0]: api.Template has no field 'Envvar'",
        ),
        (
            lambda t: t["Resources"].update(Memory=512),
            "api.Resources has no field 'Memory'",
        ),
        (lambda t: t["Templates"][0].update(Perms=493), "Templates[0].Perms: json: cannot"),
        (lambda t: t.update(KillTimeout="10s"), "Tasks[0].KillTimeout: json: cannot"),
    ],
)
async def test_the_double_refuses_what_nomad_would_drop_or_reject(
    tmp_path: Any, change: Any, message: str
) -> None:
    job = build_job(JobSpec(build_id="b-2", script="true", env={}), NomadSettings())
    change(job["TaskGroups"][0]["Tasks"][0])
    async with (
        NomadDouble(tmp_path / "nomad") as double,
        aiohttp.ClientSession() as session,
        session.put(f"{double.url}/v1/jobs", json={"Job": job}) as response,
    ):
        text = await response.text()
    assert response.status == 400
    assert message in text


def test_variable_and_signal_bodies_are_checked_too() -> None:
    check_fields({"Path": "nomad/jobs/x", "Items": {"A": "b"}, "Namespace": "ci"}, "Variable")
    check_fields({"Signal": "SIGKILL", "Task": "build"}, "AllocSignalRequest")
    with pytest.raises(ValueError, match=r"api\.Variable has no field 'Values'"):
        check_fields({"Path": "p", "Values": {}}, "Variable")


def test_a_driver_config_key_the_driver_lacks_fails_the_task() -> None:
    check_driver_config("docker", {"image": "debian:12", "pids_limit": 64, "init": True})
    with pytest.raises(ValueError, match="An argument named 'pid_limit' is not expected"):
        check_driver_config("docker", {"image": "debian:12", "pid_limit": 64})
    with pytest.raises(ValueError, match="'image'"):
        check_driver_config("raw_exec", {"command": "bash", "image": "x"})
