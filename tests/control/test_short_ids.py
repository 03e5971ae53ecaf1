"""Short ids: a unique prefix of 6+ characters stands for a build, project,
token or deploy hook id in every RPC, only ever within the caller's account;
an ambiguous one is INVALID_ARGUMENT naming the field and the candidates."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc import aio

from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import config_service_pb2 as cs
from tests.helpers import Api, ControlHandle, git


async def _rpc_error(call: object) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def _crafted_build(control: ControlHandle, build_id: str, project_id: str) -> None:
    """A finished build row with an id the test chooses (random ids almost
    never share six leading digits)."""
    async with control.plane.db.connection() as conn:
        await conn.execute(
            "INSERT INTO builds (id, project_id, account_id, branch, commit_sha, status,"
            " trigger, production)"
            " SELECT %s, id, account_id, 'main', %s, 'failed', 'manual', false"
            " FROM projects WHERE id = %s",
            (build_id, "a" * 40, project_id),
        )


async def test_a_unique_prefix_works_in_every_rpc_that_takes_an_id(api: Api, repo: Path) -> None:
    project = await api.create_project("web", repo)
    sha = git(repo, "rev-parse", "HEAD")
    build = await api.trigger("web", commit_sha=sha)
    md = api.metadata

    got = await api.config.GetBuild(cs.GetBuildRequest(build_id=build.id[:6]), metadata=md)
    assert got.build.id == build.id
    read = await api.builds.ReadLogs(bm.ReadLogsRequest(build_id=build.id[:9]), metadata=md)
    assert read.status != 0
    async for message in api.builds.StreamLogs(
        bm.StreamLogsRequest(build_id=build.id[:8].upper()), metadata=md
    ):
        assert not message.lines
    canceled = await api.builds.CancelBuild(
        bm.CancelBuildRequest(build_id=build.id[:13]), metadata=md
    )
    assert canceled.build.id == build.id
    retried = await api.config.RetryBuild(cs.RetryBuildRequest(build_id=build.id[:7]), metadata=md)
    assert retried.build.retry_of == build.id

    shown = await api.config.GetProject(cs.GetProjectRequest(project=project.id[:8]), metadata=md)
    assert shown.project.name == "web"
    listed = await api.config.ListBuilds(cs.ListBuildsRequest(project=project.id[:6]), metadata=md)
    assert {b.id for b in listed.builds} == {build.id, retried.build.id}

    token = await api.config.CreateToken(
        cs.CreateTokenRequest(name="ci", scopes=["read"]), metadata=md
    )
    revoked = await api.config.RevokeToken(
        cs.RevokeTokenRequest(token_id=token.info.id[:6]), metadata=md
    )
    assert revoked.info.id == token.info.id
    assert revoked.info.revoked_at.seconds > 0

    hook = await api.config.CreateDeployHook(
        cs.CreateDeployHookRequest(project="web", name="deploy"), metadata=md
    )
    gone = await api.config.RevokeDeployHook(
        cs.RevokeDeployHookRequest(project="web", hook_id=hook.hook.id[:6]), metadata=md
    )
    assert gone.hook.id == hook.hook.id

    # Five characters are not a prefix: too many ids would match.
    err = await _rpc_error(
        api.config.GetBuild(cs.GetBuildRequest(build_id=build.id[:5]), metadata=md)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_an_ambiguous_prefix_names_the_field_and_the_candidates(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    project = await api.create_project("web", repo)
    first = "abcdef01-0000-4000-8000-000000000001"
    second = "abcdef02-0000-4000-8000-000000000002"
    await _crafted_build(control, first, project.id)
    await _crafted_build(control, second, project.id)
    md = api.metadata

    err = await _rpc_error(api.config.GetBuild(cs.GetBuildRequest(build_id="abcdef"), metadata=md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert details.startswith("build_id: 'abcdef' is ambiguous")
    assert first in details
    assert second in details
    err = await _rpc_error(
        api.builds.CancelBuild(bm.CancelBuildRequest(build_id="ABCDEF0"), metadata=md)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # One more digit decides; dashes where the UUID has them are fine.
    got = await api.config.GetBuild(cs.GetBuildRequest(build_id="abcdef02-0"), metadata=md)
    assert got.build.id == second
    # Dashes elsewhere match nothing.
    err = await _rpc_error(
        api.config.GetBuild(cs.GetBuildRequest(build_id="abc-def02"), metadata=md)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_another_accounts_ids_are_never_candidates(
    control: ControlHandle, api: Api, repo: Path, tmp_path: Path
) -> None:
    mine = await api.create_project("web", repo)
    await _crafted_build(control, "abcdef01-0000-4000-8000-000000000001", mine.id)
    reply = await api.config.CreateAccount(
        cs.CreateAccountRequest(name="globex"), metadata=api.metadata
    )
    other = Api(control.plane.grpc_address, reply.admin_token)
    try:
        theirs = await other.create_project("web", repo)
        await _crafted_build(control, "abcdef02-0000-4000-8000-000000000002", theirs.id)
        # Each account's prefix resolves to its own build only: no ambiguity.
        assert (await api.get("abcdef")).id.startswith("abcdef01")
        assert (await other.get("abcdef")).id.startswith("abcdef02")
        # The other account's build is not found, exactly like a missing one.
        for prefix in ("abcdef02", "abcdef02-0000"):
            err = await _rpc_error(api.get(prefix))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert "abcdef01" not in (err.details() or "")
        err = await _rpc_error(
            api.config.GetProject(
                cs.GetProjectRequest(project=theirs.id[:8]), metadata=api.metadata
            )
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
        token = await other.config.CreateToken(
            cs.CreateTokenRequest(name="ci", scopes=["read"]), metadata=other.metadata
        )
        err = await _rpc_error(
            api.config.RevokeToken(
                cs.RevokeTokenRequest(token_id=token.info.id[:8]), metadata=api.metadata
            )
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await other.close()


async def test_a_project_name_wins_over_an_id_prefix_it_looks_like(api: Api, repo: Path) -> None:
    first = await api.create_project("web", repo)
    named = await api.create_project(first.id[:8], repo)
    shown = await api.config.GetProject(
        cs.GetProjectRequest(project=first.id[:8]), metadata=api.metadata
    )
    assert shown.project.id == named.id
    shown = await api.config.GetProject(
        cs.GetProjectRequest(project=first.id[:9]), metadata=api.metadata
    )
    assert shown.project.id == first.id
