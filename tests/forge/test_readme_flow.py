"""The README's "Forge integration" walk-through, end to end with the real
CLI and a real runner: connect a project, push to an excluded branch and see
the recorded reason, open a pull request and see its preview build, with a
pending then a success status at the (fake) forge."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from tests.fakes.github import FakeGitHub
from tests.forge import samples
from tests.forge.conftest import TOKEN
from tests.helpers import ControlHandle, RunnerProcess, cli, commit, git


async def test_readme_forge_walkthrough(
    control: ControlHandle, runner: RunnerProcess, repo: Path, github_api: FakeGitHub
) -> None:
    code, out, err = await cli(
        control, "projects", "create", "web", "--repo", str(repo),
        "--build-command", "bash build.sh", "--deploy-command", "echo deployed",
        "--preview-command", "echo preview of $CONVEYOR_BRANCH",
        "--branch-exclude", "wip/*", "--watch-exclude", "docs/",
        "--forge", "github", "--forge-repo", "acme/web", "--forge-api-url", github_api.url,
        "--json",
    )  # fmt: skip
    assert code == 0, err
    project = json.loads(out)
    assert project["branch_exclude"] == ["wip/*"]
    assert (project["forge"], project["forge_repo"]) == ("github", "acme/web")
    code, _, err = await cli(control, "env", "set", "web", "FORGE_TOKEN", "--secret", stdin=TOKEN)
    assert code == 0, err

    hooked = SimpleNamespace(id=project["id"], webhook_secret=project["webhook_secret"])
    # A push to an excluded branch builds nothing; the reason is recorded.
    sha = git(repo, "rev-parse", "HEAD")
    status, reply = await samples.send_github(
        control.http_url, hooked, samples.github_push("wip/experiment", sha)
    )
    assert (status, reply["result"]) == (200, "skipped")
    code, out, err = await cli(control, "builds", "list", "--all")
    assert code == 0, err
    [row] = out.splitlines()
    assert "wip/experiment" in row
    assert "skipped" in row
    assert row.endswith("skipped: branch excluded (matches 'wip/*')")
    code, out, err = await cli(control, "builds", "list")
    assert (code, out) == (0, ""), "without --all only builds are listed"

    # A pull request builds a preview of its head commit.
    git(repo, "checkout", "-q", "-b", "changes")
    head = commit(repo, "feature.txt", "new\n", "Add a feature")
    status, reply = await samples.send_github(
        control.http_url, hooked, samples.github_pull_request("opened", 1, "changes", head),
        event="pull_request",
    )  # fmt: skip
    assert (status, reply["result"]) == (202, "queued")
    build_id = reply["build_id"]
    code, followed, err = await cli(control, "logs", build_id, "--follow")
    assert code == 0, followed + err
    assert "preview of changes" in followed
    assert "deployed" not in followed
    await github_api.wait_for(lambda: github_api.states(head)[-1:] == ["success"], what="success")
    states = github_api.states(head)
    assert states[0] == "pending"
    assert states[-1] == "success"
    assert github_api.statuses[-1]["target_url"] == f"{control.http_url}/builds/{build_id}"
    code, out, err = await cli(control, "builds", "show", build_id, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["status"], shown["trigger"], shown["production"]) == (
        "succeeded", "pull_request", False,
    )  # fmt: skip
    assert shown["warnings"] == []
    code, out, err = await cli(control, "builds", "list", "--all", "--json")
    assert [b["status"] for b in json.loads(out)] == ["succeeded", "skipped"]


async def test_cli_updates_branch_rules_and_forge_settings(control: ControlHandle) -> None:
    code, _, err = await cli(
        control, "projects", "create", "web", "--repo", "https://example.com/acme/web.git",
        "--build-command", "make", "--branch-include", "feature/**", "--json",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = await cli(
        control, "projects", "update", "web", "--branch-include", "",
        "--branch-exclude", "wip/*", "--branch-exclude", "tmp/*", "--other-branches", "off",
        "--forge", "gitlab", "--forge-repo", "group/web", "--json",
    )  # fmt: skip
    assert code == 0, err
    updated = json.loads(out)
    assert updated["branch_include"] == []
    assert updated["branch_exclude"] == ["wip/*", "tmp/*"]
    assert updated["build_other_branches"] is False
    assert (updated["forge"], updated["forge_repo"]) == ("gitlab", "group/web")
    code, out, err = await cli(control, "projects", "update", "web", "--watch-include", "/abs")
    assert code == 1
    assert "INVALID_ARGUMENT: watch_include: '/abs': patterns are relative" in err
    code, out, err = await cli(control, "hooks", "create", "web", "--name", "cms", "--json")
    assert code == 0, err
    hook = json.loads(out)
    assert hook["url"] == f"{control.http_url}/hooks/deploy/{hook['key']}"
    assert hook["branch"] == "main"
    code, out, err = await cli(control, "hooks", "revoke", "web", hook["id"])
    assert (code, out.strip()) == (0, "deploy hook cms revoked")
    code, out, err = await cli(control, "hooks", "list", "web")
    assert code == 0, err
    assert "revoked" in out
