"""Which pushes build, driven by signed webhooks with the forges' documented
payloads: branch rules, [skip ci], watch paths, tags and branch deletions.
Every push that does not build is recorded with its reason and listed."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from grpc import aio

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.forge import samples
from tests.helpers import Api, ControlHandle

REPO = "https://example.com/acme/web.git"
SHA = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"


async def make_project(api: Api, **fields: Any) -> pb.Project:
    return await api.create_project("web", REPO, **fields)


async def listed(api: Api, **fields: Any) -> cs.ListBuildsResponse:
    reply: cs.ListBuildsResponse = await api.config.ListBuilds(
        cs.ListBuildsRequest(**fields), metadata=api.metadata
    )
    return reply


def skipped_total(control: ControlHandle, provider: str, reason: str) -> float:
    value = control.plane.registry.get_sample_value(
        "conveyor_pushes_skipped_total", {"provider": provider, "reason": reason}
    )
    return value or 0.0


async def test_branch_rules_decide_and_an_exclude_wins(control: ControlHandle, api: Api) -> None:
    project = await make_project(
        api, branch_include=["feature/**", "main"], branch_exclude=["feature/wip-*", "main"]
    )
    url = control.http_url
    status, reply = await samples.send_github(url, project, samples.github_push("main", SHA))
    assert (status, reply["result"]) == (202, "queued"), "the production branch always builds"
    status, reply = await samples.send_github(
        url, project, samples.github_push("feature/login", SHA)
    )
    assert (status, reply["result"]) == (202, "queued")
    status, reply = await samples.send_github(
        url, project, samples.github_push("feature/wip-login", SHA)
    )
    assert (status, reply["result"]) == (200, "skipped")
    assert reply["reason"] == "skipped: branch excluded (matches 'feature/wip-*')"
    status, reply = await samples.send_github(url, project, samples.github_push("hotfix", SHA))
    assert (status, reply["reason"]) == (200, "skipped: branch not included")
    assert skipped_total(control, "github", "branch_excluded") == 1
    assert skipped_total(control, "github", "branch_not_included") == 1
    result = await listed(api, include_skipped=True)
    assert len(result.builds) == 2
    assert [(s.branch, s.reason) for s in result.skipped] == [
        ("hotfix", "skipped: branch not included"),
        ("feature/wip-login", "skipped: branch excluded (matches 'feature/wip-*')"),
    ]
    first = result.skipped[-1]
    assert (first.provider, first.event, first.commit_sha, first.project_name) == (
        "github", "push", SHA, "web",
    )  # fmt: skip
    assert first.ref == "refs/heads/feature/wip-login"
    assert first.delivery_id
    assert not (await listed(api)).skipped, "skips are listed only on request"


async def test_builds_of_other_branches_off(control: ControlHandle, api: Api) -> None:
    project = await make_project(api, build_other_branches=False)
    status, reply = await samples.send_github(
        control.http_url, project, samples.github_push("feature", SHA)
    )
    assert (status, reply["result"]) == (200, "skipped")
    assert reply["reason"] == (
        "skipped: builds of branches other than the production branch are off"
    )
    status, reply = await samples.send_github(
        control.http_url, project, samples.github_push("main", SHA)
    )
    assert status == 202


async def test_skip_ci_in_the_head_commit_message_skips(control: ControlHandle, api: Api) -> None:
    project = await make_project(api)
    for message in ("Update docs [skip ci]", "[CI SKIP] typo"):
        status, reply = await samples.send_github(
            control.http_url, project, samples.github_push("main", SHA, message=message)
        )
        assert (status, reply["reason"]) == (200, "skipped: [skip ci] in the commit message")
    status, reply = await samples.send_github(
        control.http_url, project, samples.github_push("main", SHA, message="skip the ci, no")
    )
    assert status == 202
    result = await listed(api, include_skipped=True)
    assert len(result.skipped) == 2
    assert len(result.builds) == 1


async def test_a_push_that_touches_no_watched_file_does_not_build(
    control: ControlHandle, api: Api
) -> None:
    project = await make_project(
        api, watch_include=["src/**", "package.json"], watch_exclude=["src/**/*.md"]
    )

    shas = (f"{n:040x}" for n in range(1, 100))

    async def push(files: list[str], commits: int = 1) -> tuple[int, str]:
        # A new commit each time: a push of a commit built within the hour
        # answers with that build.
        body = samples.github_push("main", next(shas), files=files, commits=commits)
        status, reply = await samples.send_github(control.http_url, project, body)
        return status, reply.get("reason", reply["result"])

    assert await push(["src/app.py"]) == (202, "queued")
    assert await push(["package.json", "README.md"]) == (202, "queued")
    assert await push(["README.md", "docs/intro.md"]) == (200, "skipped: no watched path changed")
    assert await push(["src/guide/README.md"]) == (200, "skipped: no watched path changed")
    # A payload that does not say reliably what changed always builds.
    assert await push([]) == (202, "queued")
    assert await push([f"docs/{i}.md" for i in range(3000)]) == (202, "queued")
    assert await push(["docs/a.md"], commits=20) == (202, "queued")
    assert await push(["docs/a.md"], commits=19) == (200, "skipped: no watched path changed")
    assert skipped_total(control, "github", "no_watched_path") == 3


async def test_tag_pushes_and_branch_deletions_queue_nothing_with_a_reason(
    control: ControlHandle, api: Api
) -> None:
    project = await make_project(api)
    status, reply = await samples.send_github(
        control.http_url, project, samples.github_tag("v1.0.0", SHA)
    )
    assert (status, reply["reason"]) == (200, "skipped: tag push")
    status, reply = await samples.send_github(
        control.http_url, project, samples.github_delete("old-feature")
    )
    assert (status, reply["reason"]) == (200, "skipped: branch deleted")
    status, reply = await samples.send_gitlab(
        control.http_url, project, samples.gitlab_tag("v1.0.0", SHA), event="Tag Push Hook"
    )
    assert (status, reply["reason"]) == (200, "skipped: tag push")
    status, reply = await samples.send_gitlab(
        control.http_url, project, samples.gitlab_delete("old-feature")
    )
    assert (status, reply["reason"]) == (200, "skipped: branch deleted")
    result = await listed(api, include_skipped=True)
    assert result.builds == []
    assert [(s.provider, s.event, s.ref, s.commit_sha, s.reason) for s in result.skipped] == [
        ("gitlab", "Push Hook", "refs/heads/old-feature", "", "skipped: branch deleted"),
        ("gitlab", "Tag Push Hook", "refs/tags/v1.0.0", SHA, "skipped: tag push"),
        ("github", "push", "refs/heads/old-feature", "", "skipped: branch deleted"),
        ("github", "push", "refs/tags/v1.0.0", SHA, "skipped: tag push"),
    ]


async def test_gitlab_pushes_follow_the_same_rules(control: ControlHandle, api: Api) -> None:
    project = await make_project(
        api, production_branch="master", branch_exclude=["wip/*"], watch_include=["app/**"]
    )
    url = control.http_url
    status, reply = await samples.send_gitlab(
        url, project, samples.gitlab_push("master", SHA, files=["app/controller/application.rb"])
    )
    assert (status, reply["result"]) == (202, "queued")
    build = await api.get(reply["build_id"])
    assert (build.branch, build.commit_sha, build.trigger) == ("master", SHA, "push")
    cases = [
        (samples.gitlab_push("wip/x", SHA), "skipped: branch excluded (matches 'wip/*')"),
        (
            samples.gitlab_push("master", SHA, message="x [ci skip]"),
            "skipped: [skip ci] in the commit message",
        ),
        (
            samples.gitlab_push("master", SHA, files=["CHANGELOG"]),
            "skipped: no watched path changed",
        ),
    ]
    for body, reason in cases:
        status, reply = await samples.send_gitlab(url, project, body)
        assert (status, reply.get("reason")) == (200, reason)
    # GitLab lists only the newest 20 commits of a bigger push: it builds.
    status, reply = await samples.send_gitlab(
        url, project, samples.gitlab_push("master", "2" * 40, files=["CHANGELOG"], commits=40)
    )
    assert status == 202
    assert skipped_total(control, "gitlab", "skip_ci") == 1


async def test_a_redelivered_skip_is_recorded_once(control: ControlHandle, api: Api) -> None:
    project = await make_project(api, build_other_branches=False)
    body = samples.github_push("feature", SHA)
    first = await samples.send_github(control.http_url, project, body, delivery="d-1")
    again = await samples.send_github(control.http_url, project, body, delivery="d-1")
    assert first[1]["result"] == "skipped"
    assert again == (200, {"result": "duplicate", "reason": "delivery already processed"})
    assert len((await listed(api, include_skipped=True)).skipped) == 1


async def test_skips_are_listed_per_project_and_account(control: ControlHandle, api: Api) -> None:
    web = await make_project(api, build_other_branches=False)
    other = await api.create_project("other", REPO, build_other_branches=False)
    await samples.send_github(control.http_url, web, samples.github_push("a", SHA))
    await samples.send_github(control.http_url, other, samples.github_push("b", SHA))
    mine = await listed(api, project="web", include_skipped=True)
    assert [s.branch for s in mine.skipped] == ["a"]
    every = await listed(api, include_skipped=True, limit=1)
    assert [s.branch for s in every.skipped] == ["b"]
    created = await api.config.CreateAccount(
        cs.CreateAccountRequest(name="tenant-b"), metadata=api.metadata
    )
    stranger = Api(control.plane.grpc_address, created.admin_token)
    try:
        theirs = await listed(stranger, include_skipped=True)
    finally:
        await stranger.close()
    assert list(theirs.skipped) == []


async def test_the_first_signed_push_connects_the_forge(control: ControlHandle, api: Api) -> None:
    project = await make_project(api)
    assert (project.forge, project.forge_repo) == ("", "")
    await samples.send_github(control.http_url, project, samples.github_push("main", SHA))
    got = await api.config.GetProject(cs.GetProjectRequest(project="web"), metadata=api.metadata)
    # The repository's name comes from the payload; the API base never does
    # (empty: the forge's public API).
    assert (got.project.forge, got.project.forge_repo, got.project.forge_api_url) == (
        "github", "acme/web", "",
    )  # fmt: skip
    # Settings a user chose are never overwritten by a payload.
    explicit = await api.create_project(
        "pinned",
        REPO,
        forge="github",
        forge_repo="acme/pinned",
        forge_api_url="https://api.github.com",
    )
    await samples.send_github(control.http_url, explicit, samples.github_push("main", SHA))
    got = await api.config.GetProject(cs.GetProjectRequest(project="pinned"), metadata=api.metadata)
    assert (got.project.forge_repo, got.project.forge_api_url) == (
        "acme/pinned", "https://api.github.com",
    )  # fmt: skip
    gitlab_project = await api.create_project("gl", REPO, production_branch="master")
    await samples.send_gitlab(control.http_url, gitlab_project, samples.gitlab_push("master", SHA))
    got = await api.config.GetProject(cs.GetProjectRequest(project="gl"), metadata=api.metadata)
    assert (got.project.forge, got.project.forge_repo, got.project.forge_api_url) == (
        "gitlab", "15", "",
    )  # fmt: skip


async def test_branch_rules_and_watch_paths_can_be_updated(
    control: ControlHandle, api: Api
) -> None:
    project = await make_project(api)
    reply = await api.config.UpdateProject(
        cs.UpdateProjectRequest(
            project="web",
            values=pb.Project(branch_exclude=["dependabot/**"], watch_include=["src/"]),
            update_mask=["branch_exclude", "watch_include"],
        ),
        metadata=api.metadata,
    )
    assert list(reply.project.branch_exclude) == ["dependabot/**"]
    assert list(reply.project.watch_include) == ["src/"]
    status, body = await samples.send_github(
        control.http_url, project, samples.github_push("dependabot/npm/x", SHA)
    )
    assert (status, body["reason"]) == (
        200, "skipped: branch excluded (matches 'dependabot/**')",
    )  # fmt: skip
    reply = await api.config.UpdateProject(
        cs.UpdateProjectRequest(project="web", values=pb.Project(), update_mask=["branch_exclude"]),
        metadata=api.metadata,
    )
    assert list(reply.project.branch_exclude) == []


async def test_a_ping_connects_the_forge(control: ControlHandle, api: Api) -> None:
    project = await make_project(api)
    body = json.dumps(samples.load("github/ping")).encode()
    status, reply = await samples.send_github(control.http_url, project, body, event="ping")
    assert (status, reply) == (200, {"result": "ping"})
    got = await api.config.GetProject(cs.GetProjectRequest(project="web"), metadata=api.metadata)
    assert (got.project.forge, got.project.forge_repo) == ("github", "acme/web")
    assert (await listed(api, include_skipped=True)).skipped == []


async def test_bad_forge_settings_are_refused_and_change_nothing(
    control: ControlHandle, api: Api
) -> None:
    await make_project(api, branch_exclude=["wip/*"])
    bad = [
        (cs.CreateProjectRequest(name="x", repo_url=REPO, build_command="make",
                                 branch_exclude=["[oops"]), "branch_exclude"),
        (cs.CreateProjectRequest(name="x", repo_url=REPO, build_command="make",
                                 forge="github", forge_repo="not a repo"), "forge_repo"),
    ]  # fmt: skip
    for request, field in bad:
        with pytest.raises(aio.AioRpcError) as err:
            await api.config.CreateProject(request, metadata=api.metadata)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"{field}: ")
    for values, mask, field in (
        (pb.Project(forge="bitbucket"), ["forge"], "forge"),
        (pb.Project(watch_include=["/abs"]), ["watch_include"], "watch_include"),
        (pb.Project(forge_api_url="https://api.github.com"), ["forge_api_url"], "forge"),
    ):
        with pytest.raises(aio.AioRpcError) as err:
            await api.config.UpdateProject(
                cs.UpdateProjectRequest(project="web", values=values, update_mask=mask),
                metadata=api.metadata,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"{field}: ")
    got = await api.config.GetProject(cs.GetProjectRequest(project="web"), metadata=api.metadata)
    assert list(got.project.branch_exclude) == ["wip/*"]
    assert (got.project.forge, got.project.forge_api_url) == ("", "")
    listed_projects = await api.config.ListProjects(cs.ListProjectsRequest(), metadata=api.metadata)
    assert [p.name for p in listed_projects.projects] == ["web"]
