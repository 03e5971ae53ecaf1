"""Deploy hooks: secret URLs that build a configured branch at its head; a
second call while a build of that commit has not started is deduplicated;
listed and revoked through the API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, commit, git


async def create_hook(api: Api, **fields: Any) -> cs.CreateDeployHookResponse:
    fields.setdefault("project", "web")
    fields.setdefault("name", "cms")
    reply: cs.CreateDeployHookResponse = await api.config.CreateDeployHook(
        cs.CreateDeployHookRequest(**fields), metadata=api.metadata
    )
    return reply


async def call(url: str, method: str = "POST") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.request(method, url) as resp:
        body = await resp.json() if resp.content_type == "application/json" else {}
        return resp.status, body


async def hooks(api: Api, project: str = "web") -> list[cs.DeployHook]:
    reply = await api.config.ListDeployHooks(
        cs.ListDeployHooksRequest(project=project), metadata=api.metadata
    )
    return list(reply.hooks)


async def test_a_hook_builds_its_branch_head_and_dedupes_until_it_starts(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    created = await create_hook(api)
    assert created.key.startswith("cvh_")
    assert created.url == f"{control.http_url}/hooks/deploy/{created.key}"
    assert (created.hook.name, created.hook.branch) == ("cms", "main")
    head = git(repo, "rev-parse", "HEAD")
    status, first = await call(created.url)
    assert (status, first["result"], first["commit_sha"]) == (202, "queued", head)
    build = await api.get(first["build_id"])
    assert (build.branch, build.commit_sha, build.trigger, build.production) == (
        "main", head, "hook", True,
    )  # fmt: skip
    status, again = await call(created.url)
    assert (status, again) == (
        200, {"result": "duplicate", "build_id": first["build_id"], "commit_sha": head},
    )  # fmt: skip
    newer = commit(repo, "content.md", "# new\n", "content update")
    status, third = await call(created.url)
    assert (status, third["commit_sha"]) == (202, newer)
    assert (await api.get(first["build_id"])).status == pb.BUILD_STATUS_SUPERSEDED
    [listed] = await hooks(api)
    assert listed.last_used_at.seconds > 0
    value = control.plane.registry.get_sample_value(
        "conveyor_deploy_hook_calls_total", {"result": "duplicate"}
    )
    assert value == 1


async def test_concurrent_calls_queue_one_build(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    created = await create_hook(api, branch="main")
    results = await asyncio.gather(*(call(created.url) for _ in range(4)))
    assert sorted(body["result"] for _, body in results) == ["duplicate"] * 3 + ["queued"]
    assert len({body["build_id"] for _, body in results}) == 1
    async with control.plane.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM builds")
        row = await cur.fetchone()
    assert row is not None
    assert row[0] == 1


async def test_a_revoked_or_unknown_hook_is_404(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    created = await create_hook(api)
    revoked = await api.config.RevokeDeployHook(
        cs.RevokeDeployHookRequest(project="web", hook_id=created.hook.id), metadata=api.metadata
    )
    assert revoked.hook.revoked_at.seconds > 0
    assert await call(created.url) == (404, {"result": "not_found", "error": "no such deploy hook"})
    assert (await call(f"{control.http_url}/hooks/deploy/cvh_nope"))[0] == 404
    assert (await call(f"{control.http_url}/hooks/deploy/{'x' * 300}"))[0] == 404
    assert (await call(created.url, method="GET"))[0] == 405
    [listed] = await hooks(api)
    assert listed.revoked_at.seconds > 0
    audit = await api.config.ListAuditEvents(cs.ListAuditEventsRequest(), metadata=api.metadata)
    assert {"hook.create", "hook.revoke"} <= {e.action for e in audit.events}


async def test_a_branch_missing_from_the_repository_is_502(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    created = await create_hook(api, branch="gone")
    status, body = await call(created.url)
    assert (status, body["result"]) == (502, "error")
    assert "branch 'gone' does not exist" in body["error"]


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ({"name": "x" * 65}, grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ({"name": "a\nb"}, grpc.StatusCode.INVALID_ARGUMENT, "name"),
        ({"branch": "a..b"}, grpc.StatusCode.INVALID_ARGUMENT, "branch"),
        ({"project": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
        ({"project": ""}, grpc.StatusCode.INVALID_ARGUMENT, "project"),
    ],
)
async def test_bad_hook_requests_name_the_field(
    control: ControlHandle, api: Api, fields: dict[str, Any], code: grpc.StatusCode, field: str
) -> None:
    await api.create_project("web", "https://example.com/acme/web.git")
    with pytest.raises(aio.AioRpcError) as err:
        await create_hook(api, **fields)
    assert err.value.code() == code
    assert field in (err.value.details() or "")
    assert await hooks(api) == []


async def test_hooks_belong_to_their_account_and_need_write(
    control: ControlHandle, api: Api
) -> None:
    await api.create_project("web", "https://example.com/acme/web.git")
    created = await create_hook(api)
    reader = await api.config.CreateToken(
        cs.CreateTokenRequest(name="ro", scopes=["read"]), metadata=api.metadata
    )
    other = await api.config.CreateAccount(
        cs.CreateAccountRequest(name="tenant-b"), metadata=api.metadata
    )
    for token, expect in ((reader.token, grpc.StatusCode.PERMISSION_DENIED),
                          (other.admin_token, grpc.StatusCode.NOT_FOUND)):  # fmt: skip
        client = Api(control.plane.grpc_address, token)
        try:
            with pytest.raises(aio.AioRpcError) as err:
                await create_hook(client)
            assert err.value.code() == expect
            with pytest.raises(aio.AioRpcError) as err:
                await client.config.RevokeDeployHook(
                    cs.RevokeDeployHookRequest(project="web", hook_id=created.hook.id),
                    metadata=client.metadata,
                )
            assert err.value.code() == expect
        finally:
            await client.close()
    with pytest.raises(aio.AioRpcError) as err:
        await api.config.RevokeDeployHook(
            cs.RevokeDeployHookRequest(project="web", hook_id="not-a-uuid"), metadata=api.metadata
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert [h.revoked_at.seconds for h in await hooks(api)] == [0]
