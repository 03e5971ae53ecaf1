"""The service layer: paging, filters, account scoping and scopes, called
directly with a Principal as the dashboard does."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.errors import InvalidArgument, NotFound, PermissionDenied
from control.services.builds import BuildFilter
from control.storage.accounts import Principal
from conveyor.v1 import config_service_pb2 as cs
from tests.helpers import Api, ControlHandle, git


async def principal(control: ControlHandle, token: str) -> Principal:
    found = await control.plane.accounts.authenticate(token)
    assert found is not None
    return found


async def test_pages_are_newest_first_and_complete(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    sha = git(repo, "rev-parse", "HEAD")
    ids = [(await api.trigger("web", branch=f"b{i}", commit_sha=sha)).id for i in range(7)]
    me = await principal(control, control.admin_token)
    services = control.plane.services
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await services.builds.list(me, "web", limit=3, page_token=token)
        seen.extend(b.id for b in page.builds)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))
    assert pages == 3


async def test_filters_match_exactly_and_bad_ones_name_the_field(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    sha = git(repo, "rev-parse", "HEAD")
    a = await api.trigger("web", branch="feature/a", commit_sha=sha)
    await api.trigger("web", branch="feature/b", commit_sha=sha)
    me = await principal(control, control.admin_token)
    builds = control.plane.services.builds
    page = await builds.list(me, "web", filters=BuildFilter(branch="feature/a"))
    assert [b.id for b in page.builds] == [a.id]
    page = await builds.list(me, None, filters=BuildFilter(status="queued", trigger="manual"))
    assert len(page.builds) == 2
    page = await builds.list(me, None, filters=BuildFilter(trigger="push"))
    assert page.builds == []
    for filters, field in (
        (BuildFilter(status="done"), "status"),
        (BuildFilter(trigger="cron"), "trigger"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            await builds.list(me, "web", filters=filters)
        assert caught.value.field == field
    for token in ("junk", "W10", "x" * 300):
        with pytest.raises(InvalidArgument) as caught:
            await builds.list(me, "web", page_token=token)
        assert caught.value.field == "page_token"
    with pytest.raises(InvalidArgument) as caught:
        await builds.list(me, "web", limit=501)
    assert caught.value.field == "limit"


async def test_another_account_and_a_read_token(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("web", repo)
    sha = git(repo, "rev-parse", "HEAD")
    build = await api.trigger("web", commit_sha=sha)
    reply = await api.config.CreateAccount(
        cs.CreateAccountRequest(name="globex"), metadata=api.metadata
    )
    other = await principal(control, reply.admin_token)
    services = control.plane.services
    with pytest.raises(NotFound):
        await services.builds.get(other, build.id)
    with pytest.raises(NotFound):
        await services.builds.list(other, "web")
    with pytest.raises(NotFound):
        await services.builds.cancel(other, build.id)
    assert (await services.projects.list(other)) == []
    assert (await services.builds.list(other, None)).builds == []

    read = await api.config.CreateToken(
        cs.CreateTokenRequest(name="viewer", scopes=["read"]), metadata=api.metadata
    )
    viewer = await principal(control, read.token)
    assert (await services.builds.get(viewer, build.id)).id == build.id
    with pytest.raises(PermissionDenied):
        await services.builds.cancel(viewer, build.id)
    with pytest.raises(PermissionDenied):
        await services.builds.retry(viewer, build.id)
    summaries = await services.projects.list(viewer)
    assert [s.project.name for s in summaries] == ["web"]
    assert summaries[0].last_build is not None
    assert summaries[0].last_build.id == build.id
