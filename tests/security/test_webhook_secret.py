"""A read token leads to no deploy and to no forge token: the webhook secret
is shown at creation and on an admin's rotate only, and a signed payload
never chooses where the forge token is sent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc import aio

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.fakes.github import FakeGitHub
from tests.forge import samples
from tests.helpers import Api, ControlHandle, cli

REPO = "https://example.com/acme/web.git"
SHA = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
TOKEN = "ghp_forge_token_of_the_project_0123"
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest_asyncio.fixture
async def scoped(control: ControlHandle, api: Api) -> AsyncIterator[dict[str, Api]]:
    """A client per scope of the bootstrap account, and its project "web"."""
    await api.create_project("web", REPO)
    clients = {"admin": api}
    for scope in ("read", "write"):
        reply = await api.config.CreateToken(
            cs.CreateTokenRequest(name=scope, scopes=[scope]), metadata=api.metadata
        )
        clients[scope] = Api(control.plane.grpc_address, reply.token)
    try:
        yield clients
    finally:
        for scope in ("read", "write"):
            await clients[scope].close()


Read = Callable[[Api], Any]
READS: list[tuple[str, str, Read]] = [
    (
        "get by name",
        "read",
        lambda a: a.config.GetProject(cs.GetProjectRequest(project="web"), metadata=a.metadata),
    ),
    (
        "get as admin",
        "admin",
        lambda a: a.config.GetProject(cs.GetProjectRequest(project="web"), metadata=a.metadata),
    ),
    (
        "list",
        "read",
        lambda a: a.config.ListProjects(cs.ListProjectsRequest(), metadata=a.metadata),
    ),
    (
        "update",
        "write",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="web",
                values=pb.Project(run_timeout_seconds=60),
                update_mask=["run_timeout_seconds"],
            ),
            metadata=a.metadata,
        ),
    ),
]


@pytest.mark.parametrize(("label", "scope", "read"), READS, ids=[r[0] for r in READS])
async def test_no_read_shows_the_webhook_secret(
    control: ControlHandle, scoped: dict[str, Api], label: str, scope: str, read: Read
) -> None:
    async with control.plane.db.connection() as conn:
        row = await (await conn.execute("SELECT webhook_secret FROM projects")).fetchone()
    assert row is not None
    assert row[0]
    reply = await read(scoped[scope])
    assert row[0] not in str(reply)
    for project in [getattr(reply, "project", None), *getattr(reply, "projects", [])]:
        if project is not None:
            assert project.webhook_secret == ""


@pytest.mark.parametrize(("scope", "allowed"), [("read", False), ("write", False), ("admin", True)])
async def test_only_an_admin_rotates_the_secret_and_the_old_one_stops_working(
    control: ControlHandle, scoped: dict[str, Api], scope: str, allowed: bool
) -> None:
    client = scoped[scope]
    admin = scoped["admin"]
    async with control.plane.db.connection() as conn:
        row = await (await conn.execute("SELECT id::text, webhook_secret FROM projects")).fetchone()
    assert row is not None
    old = SimpleNamespace(id=row[0], webhook_secret=row[1])
    request = cs.RotateWebhookSecretRequest(project="web")
    if not allowed:
        with pytest.raises(aio.AioRpcError) as err:
            await client.config.RotateWebhookSecret(request, metadata=client.metadata)
        assert err.value.code() == DENIED
        status, _ = await samples.send_github(control.http_url, old, PING, event="ping")
        assert status == 200, "a refused rotate leaves the secret as it was"
        return
    reply = await client.config.RotateWebhookSecret(request, metadata=client.metadata)
    new = reply.project.webhook_secret
    assert new
    assert new != old.webhook_secret
    assert (await samples.send_github(control.http_url, old, PING, event="ping"))[0] == 401
    rotated = SimpleNamespace(id=old.id, webhook_secret=new)
    assert (await samples.send_github(control.http_url, rotated, PING, event="ping"))[0] == 200
    events = await admin.config.ListAuditEvents(
        cs.ListAuditEventsRequest(), metadata=admin.metadata
    )
    assert events.events[0].action == "project.rotate_webhook_secret"
    assert new not in str(events)
    assert old.webhook_secret not in str(events)


async def test_the_cli_shows_the_secret_on_create_and_rotate_only(control: ControlHandle) -> None:
    code, out, err = await cli(
        control, "projects", "create", "web", "--repo", REPO, "--build-command", "make", "--json"
    )
    assert code == 0, err
    created = json.loads(out)["webhook_secret"]
    code, out, err = await cli(control, "projects", "show", "web", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert "webhook_secret" not in shown
    assert created not in out
    assert shown["fork_secrets"] is False
    code, out, err = await cli(control, "projects", "rotate-webhook-secret", "web", "--json")
    assert code == 0, err
    assert json.loads(out)["webhook_secret"] not in ("", created)


PING = json.dumps(
    {**samples.load("github/ping"), "repository": {
        "full_name": "acme/web", "html_url": "http://127.0.0.1:9/acme/web",
    }}
).encode()  # fmt: skip


def gitlab_push_from(web_url: str) -> bytes:
    payload = json.loads(samples.gitlab_push("master", SHA))
    payload["project"]["web_url"] = web_url
    return json.dumps(payload).encode()


PAYLOADS: list[tuple[str, str, str, bytes]] = [
    ("github ping", "github", "ping", PING),
    (
        "github push",
        "github",
        "push",
        json.dumps(
            {
                **json.loads(samples.github_push("main", SHA)),
                "repository": {
                    "full_name": "acme/web",
                    "html_url": "http://127.0.0.1:9/acme/web",
                },
            }
        ).encode(),
    ),
    ("gitlab push", "gitlab", "Push Hook", gitlab_push_from("http://127.0.0.1:9/mike/diaspora")),
]


@pytest.mark.parametrize(
    ("label", "forge", "event", "body"), PAYLOADS, ids=[p[0] for p in PAYLOADS]
)
async def test_a_signed_payload_fills_in_the_repository_name_only(
    control: ControlHandle, api: Api, label: str, forge: str, event: str, body: bytes
) -> None:
    project = await api.create_project("web", REPO, production_branch="master")
    send = samples.send_github if forge == "github" else samples.send_gitlab
    status, reply = await send(control.http_url, project, body, event=event)
    assert status in (200, 202), reply
    got = await api.config.GetProject(cs.GetProjectRequest(project="web"), metadata=api.metadata)
    assert got.project.forge == forge
    assert got.project.forge_repo in ("acme/web", "15")
    assert got.project.forge_api_url == "", "the API base is never taken from a payload"


async def test_a_stored_base_outside_the_allow_list_never_gets_the_token(
    control: ControlHandle, api: Api
) -> None:
    """A base stored before the allow-list existed (or set in the database):
    the status is not sent, and the build says why."""
    attacker = FakeGitHub(tokens={TOKEN}, repos={"acme/web"})
    await attacker.start()
    try:
        await api.create_project("web", REPO, forge="github", forge_repo="acme/web")
        async with control.plane.db.connection() as conn:
            await conn.execute("UPDATE projects SET forge_api_url = %s", (attacker.url,))
        await api.config.SetEnvVar(
            cs.SetEnvVarRequest(project="web", name="FORGE_TOKEN", value=TOKEN, secret=True),
            metadata=api.metadata,
        )
        build = await api.trigger("web", commit_sha=SHA)
        deadline = time.monotonic() + 15
        while not (await api.get(build.id)).warnings:
            assert time.monotonic() < deadline, "no warning on the build"
            await asyncio.sleep(0.05)
        [warning] = (await api.get(build.id)).warnings
        assert "allow-list" in warning
        assert attacker.received == []
    finally:
        await attacker.stop()
