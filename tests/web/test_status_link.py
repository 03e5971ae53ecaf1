"""The commit status's "Details" link: the target_url Conveyor sends to the
forge for a build opens, in a browser, the page of that very build."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from playwright.async_api import expect

from conveyor.v1 import config_service_pb2 as cs
from tests.fakes.github import FakeGitHub
from tests.forge import samples
from tests.helpers import Api, ControlHandle
from tests.web.conftest import Dashboard, Tenant

FORGE_TOKEN = "ghp_web_status_link_0123456789"
SHA = "5e1f0c3a9b7d2e4f6a8c0b1d3e5f7a9c2b4d6e8f"


@pytest_asyncio.fixture
async def github_api() -> AsyncIterator[FakeGitHub]:
    fake = FakeGitHub(tokens={FORGE_TOKEN}, repos={"acme/web"})
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest_asyncio.fixture
async def control(database_url: str, github_api: FakeGitHub) -> AsyncIterator[ControlHandle]:
    """The shared control plane, with the fake forge's API in the allow-list."""
    handle = ControlHandle(database_url)
    handle.plane.settings = handle.plane.settings.with_(forge_api_urls=(github_api.url,))
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


async def test_the_commit_status_link_opens_that_builds_page(
    control: ControlHandle,
    dashboard: Dashboard,
    writer: Tenant,
    writer_api: Api,
    github_api: FakeGitHub,
    repo: Path,
) -> None:
    project = await writer_api.create_project(
        "web",
        repo,
        forge="github",
        forge_repo="acme/web",
        forge_api_url=github_api.url,
    )
    await writer_api.config.SetEnvVar(
        cs.SetEnvVarRequest(project="web", name="FORGE_TOKEN", value=FORGE_TOKEN, secret=True),
        metadata=writer_api.metadata,
    )
    # Another build of the project (the push below supersedes it), so a link that
    # opened "the latest build" or the project would not pass.
    other = await writer_api.trigger("web")
    status, reply = await samples.send_github(
        control.http_url, project, samples.github_push("main", SHA)
    )
    assert status == 202, reply
    build_id = str(reply["build_id"])
    await github_api.wait_for(lambda: github_api.states(SHA) == ["pending"], what="queued")
    [link] = [s["target_url"] for s in github_api.statuses if s["sha"] == SHA]

    # A reader who follows the link signs in and lands on the build.
    await dashboard.sign_in(writer.token, link.removeprefix(dashboard.url))
    page = dashboard.page
    assert page.url == link
    await expect(page.locator("#summary")).to_contain_text(SHA[:7])
    download = page.locator("a", has_text="Download raw log")
    await expect(download).to_have_attribute("href", f"/builds/{build_id}/log.txt")
    assert other.id != build_id
