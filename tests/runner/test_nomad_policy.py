"""The runner's ACL policy (deploy/nomad/conveyor-runner.policy.hcl) grants
every call the Nomad launcher makes.

A build with secrets that is stopped with a grace shorter than its
KillTimeout uses every endpoint the launcher knows; each request the double
recorded is mapped to the capability Nomad's API docs (v1.6-v1.9) require
for it, and the policy must grant that capability."""

from __future__ import annotations

import fnmatch
import re
import uuid
from pathlib import Path
from typing import Any

import hcl2
import pytest

from runner.launchers.base import JobSpec
from runner.launchers.nomad import NomadLauncher, NomadSettings
from tests.nomad_double import NomadDouble

pytestmark = pytest.mark.timeout(60)

POLICY = Path(__file__).resolve().parents[2] / "deploy" / "nomad" / "conveyor-runner.policy.hcl"

# (methods, path pattern, namespace capability or "var:<capability>"), from the
# "ACL Required" tables of api-docs/jobs, allocations, evaluations, client
# and variables.
ENDPOINTS: list[tuple[set[str], str, str]] = [
    ({"PUT", "POST"}, r"/v1/jobs", "submit-job"),
    ({"DELETE"}, r"/v1/job/[^/]+", "submit-job"),
    ({"GET"}, r"/v1/job/[^/]+", "read-job"),
    ({"GET"}, r"/v1/job/[^/]+/allocations", "read-job"),
    ({"GET"}, r"/v1/allocation/[^/]+", "read-job"),
    ({"GET"}, r"/v1/evaluation/[^/]+", "read-job"),
    ({"GET"}, r"/v1/client/fs/logs/[^/]+", "read-logs"),
    ({"GET"}, r"/v1/client/fs/ls/[^/]+", "read-fs"),
    ({"PUT", "POST"}, r"/v1/client/allocation/[^/]+/signal", "alloc-lifecycle"),
    ({"PUT"}, r"/v1/var/(?P<var>.+)", "var:write"),
    ({"GET"}, r"/v1/var/(?P<var>.+)", "var:read"),
    ({"DELETE"}, r"/v1/var/(?P<var>.+)", "var:destroy"),
]


def _unquote(value: Any) -> Any:
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [_unquote(item) for item in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def granted(namespace: str, capability: str, var_path: str | None) -> bool:
    with POLICY.open(encoding="utf-8") as handle:
        policy = _unquote(hcl2.load(handle))
    for block in policy.get("namespace", []):
        rules = block.get(namespace)
        if rules is None:
            continue
        if var_path is None:
            return capability in rules.get("capabilities", [])
        for variables in rules.get("variables", []):
            for paths in variables.get("path", []):
                for pattern, body in paths.items():
                    if fnmatch.fnmatchcase(var_path, pattern) and capability in body.get(
                        "capabilities", []
                    ):
                        return True
    return False


def required(method: str, path: str) -> tuple[str, str | None]:
    for methods, pattern, capability in ENDPOINTS:
        match = re.fullmatch(pattern, path)
        if method in methods and match:
            var_path = match.groupdict().get("var")
            return capability.removeprefix("var:"), var_path
    raise AssertionError(f"no ACL known for {method} {path}: add it here and to the policy")


async def test_the_runner_policy_grants_every_call_of_the_launcher(tmp_path: Path) -> None:
    async with NomadDouble(tmp_path / "nomad") as double:
        settings = NomadSettings(
            address=double.url,
            driver="raw_exec",
            kill_timeout_seconds=5.0,
            blocking_wait_seconds=5.0,
            log_drain_seconds=0.1,
            unreachable_seconds=5.0,
        )
        launcher = NomadLauncher(settings)
        try:
            job = await launcher.launch(
                JobSpec(
                    build_id=uuid.uuid4().hex[:16],
                    script="trap '' TERM; echo ready; sleep 60",
                    env={},
                    secret_env={"TOKEN": "s3cret"},
                )
            )
            output = job.output()
            async for line in output:
                if line.data == b"ready":
                    break
            await job.stop(0.2)  # shorter than KillTimeout: the launcher SIGKILLs
            _ = [line async for line in output]
            result = await job.wait()
        finally:
            await launcher.close()
    assert result.killed
    calls = {(r.method, r.path_qs.split("?")[0]) for r in double.requests}
    assert any(path.endswith("/signal") for _method, path in calls)
    missing = []
    for method, path in sorted(calls):
        capability, var_path = required(method, path)
        if not granted("default", capability, var_path):
            missing.append(f"{method} {path} needs {capability}")
    assert not missing, missing
