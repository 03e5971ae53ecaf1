"""Pull requests from another repository run code their author wrote: their
builds (and retries) get no secrets and no step that deploys unless the
project opts in with fork_secrets, which the audit log and `projects show`
tell."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from control.webhooks import github, gitlab
from control.webhooks.receiver import FORK_WARNING
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.forge import samples
from tests.helpers import Api, ControlHandle, ProtocolRunner

REPO = "https://example.com/acme/web.git"
HEAD = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
COMMANDS = {"deploy_command": "./deploy.sh", "preview_command": "./preview.sh"}
SECRET = "fork-must-not-see-this-0123"

Edit = Callable[[dict[str, Any]], None]


def github_pr(edit: Edit) -> bytes:
    payload = json.loads(samples.github_pull_request("opened", 5, "feature", HEAD))
    edit(payload)
    return json.dumps(payload).encode()


def gitlab_mr(edit: Edit) -> bytes:
    payload = json.loads(samples.gitlab_merge_request("open", 5, "feature", HEAD))
    edit(payload)
    return json.dumps(payload).encode()


def _set(path: str, value: object) -> Edit:
    def edit(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = payload
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


def _same(payload: dict[str, Any]) -> None:
    pass


# (label, forge, body, from a fork)
REQUESTS: list[tuple[str, str, bytes, bool]] = [
    ("github same repository", "github", github_pr(_same), False),
    ("github head is a fork", "github", github_pr(_set("pull_request.head.repo.fork", True)), True),
    (
        "github head in another repository",
        "github",
        github_pr(_set("pull_request.head.repo.full_name", "mallory/web")),
        True,
    ),
    ("github deleted fork", "github", github_pr(_set("pull_request.head.repo", None)), True),
    ("github fork flag missing", "github", github_pr(_set("pull_request.head.repo", {})), True),
    ("gitlab same project", "gitlab", gitlab_mr(_same), False),
    (
        "gitlab other source project",
        "gitlab",
        gitlab_mr(_set("object_attributes.source_project_id", 99)),
        True,
    ),
    (
        "gitlab source project missing",
        "gitlab",
        gitlab_mr(_set("object_attributes.source_project_id", None)),
        True,
    ),
]
IDS = [r[0] for r in REQUESTS]


@pytest.mark.parametrize(("label", "forge", "body", "fork"), REQUESTS, ids=IDS)
def test_parsers_tell_a_fork(label: str, forge: str, body: bytes, fork: bool) -> None:
    parse = github.parse_pull_request if forge == "github" else gitlab.parse_merge_request
    assert parse(json.loads(body)).from_fork is fork


async def project_with_secrets(api: Api, **fields: Any) -> pb.Project:
    project = await api.create_project(
        "web", REPO, production_branch="master", **COMMANDS, **fields
    )
    for name, value, secret in (
        ("API_KEY", SECRET, True),
        ("FORGE_TOKEN", "ghp_" + SECRET, True),
        ("REGION", "eu-west-1", False),
    ):
        await api.config.SetEnvVar(
            cs.SetEnvVarRequest(project="web", name=name, value=value, secret=secret),
            metadata=api.metadata,
        )
    return project


async def send(control: ControlHandle, project: pb.Project, forge: str, body: bytes) -> str:
    if forge == "github":
        status, reply = await samples.send_github(control.http_url, project, body, "pull_request")
    else:
        status, reply = await samples.send_gitlab(
            control.http_url, project, body, "Merge Request Hook"
        )
    assert (status, reply["result"]) == (202, "queued"), reply
    return str(reply["build_id"])


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "fork_secrets on"])
@pytest.mark.parametrize(("label", "forge", "body", "fork"), REQUESTS, ids=IDS)
async def test_a_forks_build_gets_no_secret_and_no_preview(
    control: ControlHandle,
    api: Api,
    proto_runner: ProtocolRunner,
    label: str,
    forge: str,
    body: bytes,
    fork: bool,
    opt_in: bool,
) -> None:
    project = await project_with_secrets(api, fork_secrets=opt_in)
    build_id = await send(control, project, forge, body)
    assignment = await proto_runner.next_assignment()
    assert assignment.build_id == build_id
    env = {v.name: v.value for v in assignment.env}
    fenced = fork and not opt_in
    assert "FORGE_TOKEN" not in env, "the forge token is for the control plane only"
    assert env["REGION"] == "eu-west-1"
    assert ("API_KEY" in env) is not fenced
    assert SECRET not in str(assignment) if fenced else env["API_KEY"] == SECRET
    commands = list(assignment.step_commands)
    assert ("./preview.sh" in commands) is not fenced
    assert "./deploy.sh" not in commands
    build = await api.get(build_id)
    assert [s.name for s in build.steps] == ["clone", *assignment.step_names]
    assert (FORK_WARNING in build.warnings) is fenced


async def test_a_retry_of_a_forks_build_stays_fenced(
    control: ControlHandle, api: Api, proto_runner: ProtocolRunner
) -> None:
    project = await project_with_secrets(api)
    body = github_pr(_set("pull_request.head.repo.fork", True))
    await send(control, project, "github", body)
    first = await proto_runner.next_assignment()
    await proto_runner.report(first, pb.BUILD_STATUS_RUNNING)
    await proto_runner.report(first, pb.BUILD_STATUS_FAILED, reason="exit_code=1")
    retry = await api.config.RetryBuild(
        cs.RetryBuildRequest(build_id=first.build_id), metadata=api.metadata
    )
    again = await proto_runner.next_assignment()
    assert again.build_id == retry.build.id
    assert {v.name for v in again.env} == {"REGION"}
    assert list(again.step_names) == list(first.step_names) == ["build"]
    assert [s.name for s in retry.build.steps] == ["clone", "build"]


async def test_opting_in_is_audited_and_shown(api: Api) -> None:
    await project_with_secrets(api)
    got = await api.config.GetProject(cs.GetProjectRequest(project="web"), metadata=api.metadata)
    assert got.project.fork_secrets is False
    reply = await api.config.UpdateProject(
        cs.UpdateProjectRequest(
            project="web", values=pb.Project(fork_secrets=True), update_mask=["fork_secrets"]
        ),
        metadata=api.metadata,
    )
    assert reply.project.fork_secrets is True
    events = await api.config.ListAuditEvents(cs.ListAuditEventsRequest(), metadata=api.metadata)
    latest = events.events[0]
    assert (latest.action, latest.details) == (
        "project.update",
        "changed=fork_secrets fork_secrets=on",
    )
    created = [e for e in events.events if e.action == "project.create"]
    assert "fork_secrets=off" in created[0].details
