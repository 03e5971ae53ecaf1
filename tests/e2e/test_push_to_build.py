"""The user flow of the walking skeleton: a signed GitHub push builds the
exact commit on a real runner, logs stream live, the CLI shows the result."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conveyor.v1 import types_pb2 as pb
from tests.helpers import (
    Api,
    ControlHandle,
    RunnerProcess,
    cli,
    commit,
    github_headers,
    github_push,
    post_webhook,
)

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_signed_push_builds_the_exact_commit_and_cli_shows_it(
    control: ControlHandle, runner: RunnerProcess, repo: Path
) -> None:
    code, out, err = await cli(
        control, "projects", "create", "web", "--repo", str(repo),
        "--production-branch", "main", "--build-command", "bash build.sh",
        "--deploy-command", "echo deployed $CONVEYOR_BRANCH", "--json",
    )  # fmt: skip
    assert code == 0, err
    project = json.loads(out)
    assert project["id"]
    assert project["webhook_secret"]

    first = commit(repo, "build.sh", 'echo "built $(cat version)"\n', "first build")
    sha = commit(repo, "version", "v2\n", "bump version")
    assert first != sha
    body = github_push("main", sha)
    status, reply = await post_webhook(
        f"{control.http_url}/webhooks/github/{project['id']}",
        body,
        github_headers(project["webhook_secret"], body),
    )
    assert status == 202, reply
    build_id = reply["build_id"]

    code, followed, err = await cli(control, "logs", build_id, "--follow")
    assert code == 0, err
    assert "built v2" in followed
    assert "deployed main" in followed

    code, out, err = await cli(control, "builds", "show", build_id, "--json")
    assert code == 0, err
    build = json.loads(out)
    assert build["status"] == "succeeded"
    assert build["commit_sha"] == sha
    assert build["branch"] == "main"
    for key in ("created_at", "started_at", "finished_at"):
        assert RFC3339_MS.match(build[key]), build[key]
    assert [s["name"] for s in build["steps"]] == ["clone", "build", "deploy"]
    assert all(s["status"] == "succeeded" and s["exit_code"] == 0 for s in build["steps"])
    assert all(s["started_at"] and s["finished_at"] for s in build["steps"])

    # The stored log is exactly what --follow printed live.
    code, stored, err = await cli(control, "logs", build_id)
    assert code == 0, err
    assert stored == followed


async def test_failing_step_fails_the_build_and_skips_the_rest(
    control: ControlHandle, runner: RunnerProcess, api: Api, repo: Path
) -> None:
    await api.create_project("broken", repo, build_command="echo before; exit 3")
    build = await api.trigger("broken")
    done = await api.wait_status(build.id)
    assert done.status == pb.BUILD_STATUS_FAILED
    assert done.status_reason == "exit_code=3 in step build"
    steps = {s.name: s for s in done.steps}
    assert steps["build"].status == pb.STEP_STATUS_FAILED
    assert steps["build"].exit_code == 3
    assert steps["deploy"].status == pb.STEP_STATUS_SKIPPED
    code, _, _ = await cli(control, "logs", build.id, "--follow")
    assert code == 1, "logs --follow exits non-zero for a failed build"


async def test_stdout_and_stderr_lines_keep_their_stream_and_order(
    control: ControlHandle, runner: RunnerProcess, api: Api, repo: Path
) -> None:
    await api.create_project(
        "streams", repo, build_command="for i in $(seq 1 300); do echo out$i; done; echo err >&2"
    )
    build = await api.trigger("streams")
    await api.wait_status(build.id)
    lines = await api.logs(build.id)
    assert [ln.number for ln in lines] == list(range(1, len(lines) + 1))
    outs = [ln.text for ln in lines if ln.text.startswith("out")]
    assert outs == [f"out{i}" for i in range(1, 301)]
    assert any(ln.text == "err" and ln.stream == pb.LOG_STREAM_STDERR for ln in lines)
