"""Two accounts: neither sees, cancels, tails or retries the other's builds,
reads its logs, or learns that its projects exist; scopes are enforced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import config_service_pb2 as cs
from tests.helpers import Api, ControlHandle


@pytest.fixture
async def other(control: ControlHandle, api: Api) -> AsyncIterator[Api]:
    reply = await api.config.CreateAccount(
        cs.CreateAccountRequest(name="globex"), metadata=api.metadata
    )
    client = Api(control.plane.grpc_address, reply.admin_token)
    try:
        yield client
    finally:
        await client.close()


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_another_account_gets_not_found_for_everything(
    api: Api, other: Api, repo: Path
) -> None:
    project = await api.create_project("secret-project", repo)
    build = await api.trigger("secret-project")
    md = other.metadata
    missing_build = "00000000-0000-0000-0000-000000000000"
    for build_id in (build.id, missing_build):
        assert (
            await code_of(other.config.GetBuild(cs.GetBuildRequest(build_id=build_id), metadata=md))
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code_of(
                other.builds.CancelBuild(bm.CancelBuildRequest(build_id=build_id), metadata=md)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code_of(
                other.config.RetryBuild(cs.RetryBuildRequest(build_id=build_id), metadata=md)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        assert await code_of(other.logs(build_id)) == grpc.StatusCode.NOT_FOUND
        assert await code_of(other.logs(build_id, follow=True)) == grpc.StatusCode.NOT_FOUND
    for ref in (project.id, project.name, "no-such-project"):
        assert (
            await code_of(other.config.GetProject(cs.GetProjectRequest(project=ref), metadata=md))
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code_of(
                other.config.TriggerBuild(cs.TriggerBuildRequest(project=ref), metadata=md)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code_of(other.config.ListEnvVars(cs.ListEnvVarsRequest(project=ref), metadata=md))
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code_of(
                other.config.DeleteProject(cs.DeleteProjectRequest(project=ref), metadata=md)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code_of(other.config.PurgeCache(cs.PurgeCacheRequest(project=ref), metadata=md))
            == grpc.StatusCode.NOT_FOUND
        )
    listed = await other.config.ListProjects(cs.ListProjectsRequest(), metadata=md)
    assert list(listed.projects) == []
    builds = await other.config.ListBuilds(cs.ListBuildsRequest(), metadata=md)
    assert list(builds.builds) == []
    # The same name is free in the other account: names are per account.
    assert (await other.create_project("secret-project", repo)).id != project.id
    # And the original is untouched.
    assert (await api.get(build.id)).status != 0
    kept = await api.config.GetProject(
        cs.GetProjectRequest(project=project.id), metadata=api.metadata
    )
    assert kept.project.cache_generation == 1


async def test_a_read_token_cannot_write_and_a_revoked_token_stops_working(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("scoped", repo)
    reply = await api.config.CreateToken(
        cs.CreateTokenRequest(name="ci-reader", scopes=["read"]), metadata=api.metadata
    )
    assert reply.token.startswith("cvy_")
    reader = Api(control.plane.grpc_address, reply.token)
    try:
        listed = await reader.config.ListProjects(
            cs.ListProjectsRequest(), metadata=reader.metadata
        )
        assert [p.name for p in listed.projects] == ["scoped"]
        assert await code_of(reader.trigger("scoped")) == grpc.StatusCode.PERMISSION_DENIED
        assert (
            await code_of(
                reader.config.CreateToken(cs.CreateTokenRequest(name="x"), metadata=reader.metadata)
            )
            == grpc.StatusCode.PERMISSION_DENIED
        )
        await api.config.RevokeToken(
            cs.RevokeTokenRequest(token_id=reply.info.id), metadata=api.metadata
        )
        # Token answers are cached for at most two seconds.
        import asyncio

        await asyncio.sleep(2.1)
        assert (
            await code_of(
                reader.config.ListProjects(cs.ListProjectsRequest(), metadata=reader.metadata)
            )
            == grpc.StatusCode.UNAUTHENTICATED
        )
    finally:
        await reader.close()
    tokens = await api.config.ListTokens(cs.ListTokensRequest(), metadata=api.metadata)
    listed_reader = [t for t in tokens.tokens if t.name == "ci-reader"]
    assert listed_reader[0].revoked_at.seconds > 0
    assert reply.token not in str(tokens)


async def test_missing_or_unknown_tokens_are_unauthenticated(control: ControlHandle) -> None:
    for token in ("", "cvy_not-a-token", control.runner_token):
        client = Api(control.plane.grpc_address, token)
        try:
            code = await code_of(
                client.config.ListProjects(cs.ListProjectsRequest(), metadata=client.metadata)
            )
            expected = (
                grpc.StatusCode.PERMISSION_DENIED
                if token == control.runner_token
                else grpc.StatusCode.UNAUTHENTICATED
            )
            assert code == expected
        finally:
            await client.close()


async def test_changes_are_audited_without_secret_values(api: Api, repo: Path) -> None:
    await api.create_project("audited", repo)
    await api.config.SetEnvVar(
        cs.SetEnvVarRequest(project="audited", name="API_KEY", value="hunter2-value", secret=True),
        metadata=api.metadata,
    )
    await api.config.CreateToken(
        cs.CreateTokenRequest(name="deployer", scopes=["write"]), metadata=api.metadata
    )
    events = await api.config.ListAuditEvents(cs.ListAuditEventsRequest(), metadata=api.metadata)
    actions = [e.action for e in events.events]
    assert actions[:3] == ["token.create", "secret.set", "project.create"]
    assert all(e.actor == "admin" for e in events.events)
    assert "hunter2-value" not in str(events)
