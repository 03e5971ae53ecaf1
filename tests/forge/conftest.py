"""Fixtures of the forge tests: a control plane whose commit-status retries
are fast, and the GitHub and GitLab API fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from common.retry import RetryPolicy
from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab
from tests.helpers import ControlHandle

FAST_RETRY = RetryPolicy(base=0.05, cap=0.2, jitter=(0.8, 1.2), attempts=4)
TOKEN = "ghp_test_token_0123456789"


@pytest_asyncio.fixture
async def control(
    database_url: str, github_api: FakeGitHub, gitlab_api: FakeGitLab
) -> AsyncIterator[ControlHandle]:
    """The shared ``control`` fixture, with commit-status retries that take
    a fraction of a second, and the fakes' API bases in the operator's
    allow-list (as a self-hosted forge's would be). Runners count as lost
    only after a minute: the test runner here speaks for itself and a loaded
    machine must not make it look gone."""
    handle = ControlHandle(database_url, runner_lost_after=60.0)
    handle.plane.forge_retry = FAST_RETRY
    handle.plane.settings = handle.plane.settings.with_(
        forge_api_urls=(github_api.url, gitlab_api.url)
    )
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


@pytest_asyncio.fixture
async def github_api() -> AsyncIterator[FakeGitHub]:
    fake = FakeGitHub(tokens={TOKEN}, repos={"acme/web"})
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest_asyncio.fixture
async def gitlab_api() -> AsyncIterator[FakeGitLab]:
    fake = FakeGitLab(tokens={TOKEN}, projects={"15", "1", "mike/diaspora"})
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
