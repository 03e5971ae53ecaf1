"""The HTTP/JSON API: transcoded from the protos' google.api.http rules onto
the same servicers as gRPC, with the same tokens, scopes and errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control.api.edge import ACCESS
from conveyor.v1 import build_manager_pb2, config_service_pb2
from conveyor.v1 import config_service_pb2 as cs
from tests.helpers import Api, ControlHandle, RunnerProcess, git, make_repo

# RPCs that are not for people or scripts: the runner's, the scheduler's.
NOT_ANNOTATED = {"/conveyor.v1.BuildManager/StartBuild"}


class Http:
    """A JSON client of one control plane with one bearer token."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session = session
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(
        self, method: str, path: str, body: object = None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        async with self.session.request(
            method, self.base + path, data=data, headers=self.headers
        ) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None


@pytest.fixture
async def http(control: ControlHandle) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(session, control.http_url, control.admin_token)


def test_every_user_rpc_has_an_http_rule_and_an_access_entry() -> None:
    annotated = set()
    for module, service in (
        (config_service_pb2, "ConfigService"),
        (build_manager_pb2, "BuildManager"),
    ):
        desc = module.DESCRIPTOR.services_by_name[service]
        for method in desc.methods:
            path = f"/{desc.full_name}/{method.name}"
            assert path in ACCESS, path
            if path in NOT_ANNOTATED:
                continue
            options = method.GetOptions()
            from google.api import annotations_pb2

            assert options.HasExtension(annotations_pb2.http), f"{path} has no google.api.http"
            annotated.add(path)
    assert len(annotated) > 20


async def test_routes_cover_every_annotated_rpc(control: ControlHandle) -> None:
    methods = {route.method for route in control.plane.api_routes}
    for path in ACCESS:
        if path.startswith(("/conveyor.v1.ConfigService/", "/conveyor.v1.BuildManager/")):
            assert (path in methods) != (path in NOT_ANNOTATED), path


async def test_project_and_build_round_trip(http: Http, control: ControlHandle, repo: Path) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    status, body = await http.call(
        "POST",
        "/api/v1/projects",
        {"name": "web", "repoUrl": str(repo), "buildCommand": "bash build.sh"},
    )
    assert status == 200, body
    assert body["project"]["name"] == "web"
    status, body = await http.call("GET", "/api/v1/projects/web")
    assert status == 200
    assert body["project"]["repoUrl"] == str(repo)
    assert body["project"].get("webhookSecret", "") == ""
    status, body = await http.call("GET", "/api/v1/projects")
    assert [p["name"] for p in body["projects"]] == ["web"]

    status, body = await http.call(
        "POST", "/api/v1/projects/web/builds", {"branch": "feature/x", "commitSha": sha}
    )
    assert status == 200, body
    build = body["build"]
    assert build["status"] == "BUILD_STATUS_QUEUED"
    assert build["branch"] == "feature/x"
    status, body = await http.call("GET", f"/api/v1/builds/{build['id']}")
    assert status == 200
    assert body["build"]["commitSha"] == sha

    status, body = await http.call("GET", "/api/v1/projects/web/builds?branch=feature%2Fx")
    assert [b["id"] for b in body["builds"]] == [build["id"]]
    assert body["nextPageToken"] == ""
    status, body = await http.call("GET", "/api/v1/builds?branch=main")
    assert status == 200
    assert body["builds"] == []
    status, body = await http.call("GET", "/api/v1/builds?status=BUILD_STATUS_QUEUED&limit=1")
    assert [b["id"] for b in body["builds"]] == [build["id"]]

    status, body = await http.call("POST", f"/api/v1/builds/{build['id']}:cancel")
    assert status == 200, body
    assert body["build"]["status"] == "BUILD_STATUS_CANCELED"
    status, body = await http.call("POST", f"/api/v1/builds/{build['id']}:cancel")
    assert status == 400
    assert body["code"] == "FAILED_PRECONDITION"
    status, body = await http.call("POST", f"/api/v1/builds/{build['id']}:retry", {})
    assert status == 200, body
    assert body["build"]["retryOf"] == build["id"]

    status, body = await http.call("GET", f"/api/v1/builds/{build['id']}/logs")
    assert status == 200
    assert body["lines"] == []
    assert body["complete"] is True
    assert body["status"] == "BUILD_STATUS_CANCELED"

    status, body = await http.call("PUT", "/api/v1/projects/web/env/REGION", {"value": "eu"})
    assert status == 200, body
    status, body = await http.call("GET", "/api/v1/projects/web/env")
    assert [(v["name"], v["value"]) for v in body["vars"]] == [("REGION", "eu")]
    status, body = await http.call("DELETE", "/api/v1/projects/web/env/REGION")
    assert status == 200, body


async def test_errors_are_json_with_the_matching_status(
    http: Http, control: ControlHandle, api: Api, repo: Path
) -> None:
    anonymous = Http(http.session, http.base, "")
    status, body = await anonymous.call("GET", "/api/v1/projects")
    assert status == 401
    assert body["code"] == "UNAUTHENTICATED"
    wrong = Http(http.session, http.base, "cvy_not-a-token")
    status, body = await wrong.call("GET", "/api/v1/projects")
    assert status == 401

    status, body = await http.call("GET", "/api/v1/nothing/here")
    assert status == 404
    assert body["code"] == "NOT_FOUND"
    status, body = await http.call("DELETE", "/api/v1/builds")
    assert status == 405

    missing = "00000000-0000-0000-0000-000000000000"
    status, body = await http.call("GET", f"/api/v1/builds/{missing}")
    assert status == 404
    assert body["code"] == "NOT_FOUND"

    read = await api.config.CreateToken(
        cs.CreateTokenRequest(name="viewer", scopes=["read"]), metadata=api.metadata
    )
    viewer = Http(http.session, http.base, read.token)
    status, body = await viewer.call("POST", "/api/v1/projects", {"name": "x", "repoUrl": "y"})
    assert status == 403
    assert body["code"] == "PERMISSION_DENIED"


BAD_INPUT = [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (b'{"name": "web", "colour": "red"}', "colour"),
    (b'{"name": "web", "runTimeoutSeconds": "soon"}', "run_timeout_seconds"),
    (b'{"name": "web", "cancelInProgress": "yes"}', "cancel_in_progress"),
    (b'{"name": "web", "branchInclude": "main"}', "branch_include"),
    (b'{"name": "web", "repoUrl": {"a": 1}}', "repo_url"),
    (b'{"name": ' + b"[" * 2000 + b"]" * 2000 + b"}", "body"),
    (b'{"name": "bad name!", "repoUrl": "/tmp/x"}', "name"),
]


@pytest.mark.parametrize(("raw", "field"), BAD_INPUT)
async def test_bad_input_names_the_field_and_stores_nothing(
    http: Http, raw: bytes, field: str
) -> None:
    status, body = await http.call("POST", "/api/v1/projects", raw=raw)
    assert status == 400, body
    assert body["code"] == "INVALID_ARGUMENT"
    assert body["field"] == field, body
    assert field in body["message"]
    status, body = await http.call("GET", "/api/v1/projects")
    assert body["projects"] == []


async def test_bad_query_parameters_name_the_parameter(http: Http) -> None:
    for query, field in (
        ("limit=many", "limit"),
        ("limit=501", "limit"),
        ("status=BUILD_STATUS_DONE", "status"),
        ("colour=red", "colour"),
        ("includeSkipped=perhaps", "include_skipped"),
        ("pageToken=xyz", "page_token"),
    ):
        status, body = await http.call("GET", f"/api/v1/builds?{query}")
        assert status == 400, (query, body)
        assert body["field"] == field, (query, body)


async def test_another_accounts_objects_answer_404(
    http: Http, control: ControlHandle, api: Api, repo: Path
) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    await api.create_project("web", repo)
    build = await api.trigger("web", commit_sha=sha)
    reply = await api.config.CreateAccount(
        cs.CreateAccountRequest(name="globex"), metadata=api.metadata
    )
    other = Http(http.session, http.base, reply.admin_token)
    for method, path in (
        ("GET", "/api/v1/projects/web"),
        ("GET", "/api/v1/projects/web/builds"),
        ("GET", f"/api/v1/builds/{build.id}"),
        ("POST", f"/api/v1/builds/{build.id}:cancel"),
        ("POST", f"/api/v1/builds/{build.id}:retry"),
        ("GET", f"/api/v1/builds/{build.id}/logs"),
    ):
        status, body = await other.call(method, path)
        assert status == 404, (method, path, body)
    assert (await api.get(build.id)).status != 0


async def read_events(
    response: aiohttp.ClientResponse, until: int | None = None
) -> AsyncIterator[tuple[str, str, str]]:
    """(event, id, data) of an SSE stream; comment lines as ("comment", "", text)."""
    event, event_id, data = "message", "", []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            yield "comment", "", line[1:].strip()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield event, event_id, "\n".join(data)
            event, event_id, data = "message", "", []


SLOW_BUILD = 'for i in $(seq 1 60); do echo "line $i"; sleep 0.02; done\n'


async def test_sse_resumes_from_last_event_id_with_no_gap_and_no_duplicate(
    control: ControlHandle, runner: RunnerProcess, api: Api, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "slow", SLOW_BUILD)
    await api.create_project("slow", repo)
    build = await api.trigger("slow", commit_sha=git(repo, "rev-parse", "HEAD"))
    url = f"{control.http_url}/api/v1/builds/{build.id}/logs?follow=true"
    headers = {"Authorization": f"Bearer {control.admin_token}", "Accept": "text/event-stream"}
    numbers: list[int] = []
    last_id = ""
    final: dict[str, Any] | None = None
    async with aiohttp.ClientSession() as session:
        # Drop the connection after each few events, as a flaky network would,
        # while the build goes on writing.
        for _ in range(200):
            extra = {"Last-Event-ID": last_id} if last_id else {}
            async with session.get(url, headers={**headers, **extra}) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                events = 0
                async for event, event_id, data in read_events(response):
                    if event == "comment":
                        continue
                    payload = json.loads(data)
                    numbers.extend(int(x["number"]) for x in payload.get("lines", []))
                    if event_id:
                        last_id = event_id
                    if payload.get("status"):
                        final = payload
                        break
                    events += 1
                    if events == 2:
                        break
            if final is not None:
                break
    assert final is not None
    assert final["status"] == "BUILD_STATUS_SUCCEEDED"
    stored = [line.number for line in await api.logs(build.id)]
    assert numbers == stored == list(range(1, len(stored) + 1))
    assert any("line 60" in line.text for line in await api.logs(build.id))


async def test_sse_sends_keepalive_comments_while_the_build_is_quiet(
    control: ControlHandle, runner: RunnerProcess, api: Api, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "quiet", "echo start; sleep 1.5; echo end\n")
    await api.create_project("quiet", repo)
    build = await api.trigger("quiet", commit_sha=git(repo, "rev-parse", "HEAD"))
    control.plane.api.keepalive = 0.2
    url = f"{control.http_url}/api/v1/builds/{build.id}/logs?follow=true"
    headers = {"Authorization": f"Bearer {control.admin_token}", "Accept": "text/event-stream"}
    comments = 0
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        async with asyncio.timeout(30):
            async for event, _, data in read_events(response):
                if event == "comment":
                    comments += 1
                elif json.loads(data).get("status"):
                    break
    assert comments >= 2


async def test_sse_errors_before_the_first_event_are_plain_json(
    control: ControlHandle, http: Http
) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    headers = {**http.headers, "Accept": "text/event-stream"}
    url = f"{control.http_url}/api/v1/builds/{missing}/logs?follow=true"
    async with http.session.get(url, headers=headers) as response:
        assert response.status == 404
        assert (await response.json())["code"] == "NOT_FOUND"
    url = f"{control.http_url}/api/v1/builds/{missing}/logs?follow=true&cursor=bogus"
    async with http.session.get(url, headers=headers) as response:
        assert response.status in (400, 404)
