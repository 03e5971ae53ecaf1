"""The commit-status clients: one contract, the same assertions for GitHub
and GitLab, each against its API fake; and the fakes' own documented
shapes (status codes, required fields, validation errors)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from control.forge.github import GitHubStatuses
from control.forge.gitlab import GitLabStatuses
from control.forge.statuses import (
    CommitStatuses,
    ForgeRejected,
    ForgeState,
    ForgeTarget,
    ForgeUnavailable,
    StatusUpdate,
)
from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab
from tests.fakes.server import FakeServer
from tests.forge.conftest import TOKEN

SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


@dataclass
class Forge:
    """One implementation under the contract: its client, its fake, and a
    target the fake accepts."""

    client: CommitStatuses
    fake: FakeServer
    target: ForgeTarget
    impatient: CommitStatuses

    def states(self) -> list[str]:
        assert isinstance(self.fake, FakeGitHub | FakeGitLab)
        return self.fake.states(SHA)

    def recorded(self) -> list[dict[str, Any]]:
        assert isinstance(self.fake, FakeGitHub | FakeGitLab)
        return self.fake.statuses


@pytest_asyncio.fixture(params=["github", "gitlab"])
async def forge(request: pytest.FixtureRequest) -> AsyncIterator[Forge]:
    fake: FakeGitHub | FakeGitLab
    async with aiohttp.ClientSession() as session:
        if request.param == "github":
            fake = FakeGitHub(tokens={TOKEN}, repos={"acme/web"})
            await fake.start()
            target = ForgeTarget("github", fake.url, "acme/web", TOKEN)
            yield Forge(GitHubStatuses(session), fake, target, GitHubStatuses(session, 0.3))
        else:
            fake = FakeGitLab(tokens={TOKEN}, projects={"15", "mike/diaspora"})
            await fake.start()
            target = ForgeTarget("gitlab", fake.url, "15", TOKEN)
            yield Forge(GitLabStatuses(session), fake, target, GitLabStatuses(session, 0.3))
        await fake.stop()


def update(state: ForgeState, description: str = "Build queued") -> StatusUpdate:
    return StatusUpdate(
        sha=SHA,
        state=state,
        description=description,
        target_url="http://conveyor.example.com/builds/1",
        context="conveyor/web",
        ref="main",
    )


async def test_statuses_arrive_in_order_with_context_description_and_link(forge: Forge) -> None:
    for state in (ForgeState.PENDING, ForgeState.RUNNING, ForgeState.SUCCESS):
        await forge.client.post(forge.target, update(state, f"now {state.value}"))
    said = [forge.client.forge_state(s) for s in (ForgeState.RUNNING, ForgeState.SUCCESS)]
    assert forge.states()[-2:] == said
    last = forge.recorded()[-1]
    assert last.get("context", last.get("name")) == "conveyor/web"
    assert last["description"] == "now success"
    assert last["target_url"] == "http://conveyor.example.com/builds/1"


async def test_the_same_state_twice_is_accepted(forge: Forge) -> None:
    # GitLab's state machine refuses running -> running; the client knows
    # that answer means the status already says so.
    await forge.client.post(forge.target, update(ForgeState.RUNNING, "starting"))
    await forge.client.post(forge.target, update(ForgeState.RUNNING, "running"))
    assert forge.states()[0] == forge.client.forge_state(ForgeState.RUNNING)


async def test_a_long_description_is_shortened_to_what_the_forge_takes(forge: Forge) -> None:
    await forge.client.post(forge.target, update(ForgeState.FAILURE, "x" * 1000))
    description = forge.recorded()[-1]["description"]
    assert description.endswith("…")
    assert len(description) <= 255


async def test_a_bad_token_is_rejected_with_401(forge: Forge) -> None:
    target = ForgeTarget(forge.target.forge, forge.target.api_url, forge.target.repo, "wrong")
    with pytest.raises(ForgeRejected) as err:
        await forge.client.post(target, update(ForgeState.PENDING))
    assert err.value.status == 401
    assert "wrong" not in str(err.value)
    assert forge.recorded() == []


async def test_an_unknown_repository_is_rejected_with_404(forge: Forge) -> None:
    repo = "acme/other" if forge.target.forge == "github" else "99"
    target = ForgeTarget(forge.target.forge, forge.target.api_url, repo, TOKEN)
    with pytest.raises(ForgeRejected) as err:
        await forge.client.post(target, update(ForgeState.PENDING))
    assert err.value.status == 404


async def test_a_forge_answering_503_is_unavailable(forge: Forge) -> None:
    forge.fake.mode = "503"
    with pytest.raises(ForgeUnavailable) as err:
        await forge.client.post(forge.target, update(ForgeState.PENDING))
    assert err.value.status == 503


async def test_a_forge_refusing_connections_is_unavailable(forge: Forge) -> None:
    await forge.fake.refuse()
    with pytest.raises(ForgeUnavailable) as err:
        await forge.client.post(forge.target, update(ForgeState.PENDING))
    assert err.value.status is None
    await forge.fake.up()
    await forge.client.post(forge.target, update(ForgeState.PENDING))
    assert forge.states() == [forge.client.forge_state(ForgeState.PENDING)]


async def test_a_forge_that_does_not_answer_in_time_is_unavailable(forge: Forge) -> None:
    forge.fake.mode = "slow"
    forge.fake.slow_seconds = 0.6
    with pytest.raises(ForgeUnavailable, match=r"no answer within 0\.3 s"):
        await forge.impatient.post(forge.target, update(ForgeState.PENDING))


def test_every_state_maps_to_a_documented_forge_state() -> None:
    github = GitHubStatuses.__new__(GitHubStatuses)
    gitlab = GitLabStatuses.__new__(GitLabStatuses)
    for state in ForgeState:
        assert github.forge_state(state) in ("error", "failure", "pending", "success")
        assert gitlab.forge_state(state) in ("pending", "running", "success", "failed", "canceled")


# --- the fakes follow the documented shapes --------------------------------


async def _post(url: str, headers: dict[str, str], body: object) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_fake_github_answers_like_the_statuses_api(github_api: FakeGitHub) -> None:
    url = f"{github_api.url}/repos/acme/web/statuses/{SHA}"
    auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/vnd.github+json"}
    status, body = await _post(url, auth, {"state": "success", "context": "ci"})
    assert status == 201
    assert {"url", "id", "node_id", "state", "description", "target_url", "context",
            "created_at", "updated_at", "creator"} <= set(body)  # fmt: skip
    assert (body["state"], body["context"]) == ("success", "ci")
    status, body = await _post(url, auth, {"state": "running"})
    assert status == 422
    assert body["message"] == "Validation Failed"
    assert body["errors"][0]["field"] == "state"
    status, body = await _post(url, auth, {"state": "pending", "description": "d" * 141})
    assert (status, body["errors"][0]["field"]) == (422, "description")
    status, body = await _post(url, auth, {"description": "no state"})
    assert status == 422
    status, body = await _post(url, {"Authorization": "Bearer nope"}, {"state": "success"})
    assert (status, body["message"]) == (401, "Bad credentials")
    status, body = await _post(
        f"{github_api.url}/repos/acme/nope/statuses/{SHA}", auth, {"state": "success"}
    )
    assert (status, body["message"]) == (404, "Not Found")
    status, body = await _post(
        f"{github_api.url}/repos/acme/web/statuses/abc", auth, {"state": "success"}
    )
    assert status == 422
    assert "No commit found" in body["message"]
    assert github_api.states() == ["success"]


async def test_fake_gitlab_answers_like_the_commit_status_api(gitlab_api: FakeGitLab) -> None:
    url = f"{gitlab_api.url}/projects/mike%2Fdiaspora/statuses/{SHA}"
    auth = {"PRIVATE-TOKEN": TOKEN}
    status, body = await _post(url, auth, {"state": "pending", "name": "ci", "ref": "main"})
    assert status == 201
    documented = {"id", "sha", "ref", "status", "name", "target_url", "description",
                  "created_at", "started_at", "finished_at", "allow_failure", "coverage",
                  "author"}  # fmt: skip
    assert documented <= set(body)
    assert (body["status"], body["name"], body["sha"]) == ("pending", "ci", SHA)
    status, body = await _post(url, auth, {"state": "pending", "name": "ci"})
    assert status == 400
    assert body["message"].startswith("Cannot transition status via :enqueue from :pending")
    status, body = await _post(url, auth, {"state": "error", "name": "ci"})
    assert (status, body["error"]) == (400, "state does not have a valid value")
    status, body = await _post(url, auth, {"name": "ci"})
    assert (status, body["error"]) == (400, "state is missing")
    status, _ = await _post(url, auth, {"state": "success", "name": "ci"})
    assert status == 201
    status, body = await _post(url, {"PRIVATE-TOKEN": "nope"}, {"state": "success"})
    assert (status, body["message"]) == (401, "401 Unauthorized")
    status, body = await _post(
        f"{gitlab_api.url}/projects/404/statuses/{SHA}", auth, {"state": "success"}
    )
    assert (status, body["message"]) == (404, "404 Project Not Found")
    assert gitlab_api.states() == ["pending", "success"]
