"""The pure parts: globs, the push decision, payload parsing and project
validation of the forge settings."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from control.domain.build import Build, BuildStatus
from control.domain.project import Project, ProjectSettings, glob_regex
from control.errors import InvalidArgument
from control.forge.statuses import ForgeState, status_of
from control.webhooks import github, gitlab, rules
from control.webhooks.push import ForgeRepo, PushEvent, RequestAction
from tests.forge import samples

SHA = "a" * 40
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def project(**changes: object) -> Project:
    base = Project(
        id="p", account_id="a", name="web", repo_url="/r", production_branch="main",
        build_command="make", deploy_command="", preview_command="", webhook_secret="s",
        run_timeout_seconds=60, cancel_in_progress=False, build_other_branches=True,
        root_directory="", created_at=NOW, updated_at=NOW,
    )  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


def push(branch: str = "main", **changes: object) -> PushEvent:
    base = PushEvent(ref=f"refs/heads/{branch}", commit_sha=SHA, changed_files=("README.md",))
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("feature/*", "feature/login", True),
        ("feature/*", "feature/login/v2", False),
        ("feature/**", "feature/login/v2", True),
        ("**/*.md", "README.md", True),
        ("**/*.md", "docs/guide/intro.md", True),
        ("docs/", "docs/guide/intro.md", True),
        ("docs/", "docsite/index.md", False),
        ("src/**/test_*.py", "src/test_a.py", True),
        ("src/**/test_*.py", "src/a/b/test_a.py", True),
        ("release-?", "release-1", True),
        ("release-?", "release-10", False),
        ("v[0-9].*", "v1.2", True),
        ("[!w]*", "wip", False),
        ("*.lock", "a.lock", True),
        ("a+b", "a+b", True),
        ("a+b", "aab", False),
        ("*", "a/b", False),
    ],
)
def test_globs(pattern: str, value: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).fullmatch(value)) is matches


def test_the_production_branch_builds() -> None:
    assert rules.skip_reason(project(), push("main")) is None


def test_other_branches_need_builds_of_other_branches_on() -> None:
    off = project(build_other_branches=False)
    assert rules.skip_reason(off, push("feature")) == rules.OTHER_BRANCHES_OFF
    assert rules.skip_reason(off, push("main")) is None


def test_an_exclude_wins_over_an_include() -> None:
    p = project(branch_include=("feature/*",), branch_exclude=("feature/wip-*",))
    assert rules.skip_reason(p, push("feature/login")) is None
    reason = rules.skip_reason(p, push("feature/wip-x"))
    assert reason is not None
    assert reason.startswith(rules.BRANCH_EXCLUDED)
    assert rules.skip_reason(p, push("hotfix")) == rules.BRANCH_NOT_INCLUDED
    # The production branch always passes the branch lists.
    assert rules.skip_reason(replace(p, branch_exclude=("*",)), push("main")) is None


@pytest.mark.parametrize("message", ["Fix typo [skip ci]", "[CI SKIP] docs", "x\n\n[skip ci]"])
def test_skip_markers_in_the_head_commit_message_skip(message: str) -> None:
    assert rules.skip_reason(project(), push(head_message=message)) == rules.SKIP_CI


def test_watch_paths() -> None:
    p = project(watch_include=("src/**",), watch_exclude=("src/**/*.md",))
    assert rules.skip_reason(p, push(changed_files=("src/app.py",))) is None
    assert rules.skip_reason(p, push(changed_files=("src/README.md",))) == rules.NO_WATCHED_PATH
    assert rules.skip_reason(p, push(changed_files=("docs/a.md",))) == rules.NO_WATCHED_PATH
    only_exclude = project(watch_exclude=("docs/",))
    assert rules.skip_reason(only_exclude, push(changed_files=("docs/a",))) is not None
    assert rules.skip_reason(only_exclude, push(changed_files=("docs/a", "b"))) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"changed_files": ()},
        {"changed_files": tuple(f"docs/{i}" for i in range(3000))},
        {"changed_files": ("docs/a",), "commit_count": 20},
    ],
    ids=["no files", "3000 files", "20 commits"],
)
def test_pushes_that_do_not_say_what_changed_always_build(changes: dict[str, object]) -> None:
    p = project(watch_include=("src/**",))
    assert rules.skip_reason(p, push(**changes)) is None
    fewer = {"changed_files": ("docs/a",), "commit_count": 19}
    assert rules.skip_reason(p, push(**fewer)) == rules.NO_WATCHED_PATH


def test_tags_and_branch_deletions_never_build() -> None:
    assert rules.skip_reason(project(), PushEvent("refs/tags/v1", SHA)) == rules.TAG_PUSH
    deleted = PushEvent("refs/heads/main", "0" * 40)
    assert rules.skip_reason(project(), deleted) == rules.BRANCH_DELETED


def test_reason_labels_are_bounded() -> None:
    assert rules.reason_label(rules.BRANCH_EXCLUDED + " (matches 'x')") == "branch_excluded"
    assert rules.reason_label("something else") == "other"


def test_github_push_payload_lists_files_commits_and_repository() -> None:
    body = samples.github_push("main", SHA, files=["a", "b"], commits=3)
    event = github.parse_push(json.loads(body))
    assert (event.branch, event.commit_sha, event.commit_count) == ("main", SHA, 3)
    assert event.changed_files == ("a", "b")
    assert event.repo == ForgeRepo("github", "acme/web")
    # A payload's html_url does not move the API: only the name is read.
    ghe = json.loads(body)
    ghe["repository"]["html_url"] = "https://attacker.example/acme/web"
    assert github.parse_push(ghe).repo == ForgeRepo("github", "acme/web")


def test_gitlab_push_counts_all_commits_and_names_the_project() -> None:
    event = gitlab.parse_push(json.loads(samples.gitlab_push("main", SHA, commits=25)))
    assert event.commit_count == 25
    assert event.repo == ForgeRepo("gitlab", "15")


def test_request_actions() -> None:
    opened = github.parse_pull_request(
        json.loads(samples.github_pull_request("opened", 7, "changes", SHA))
    )
    assert (opened.kind, opened.number, opened.branch, opened.commit_sha) == (
        RequestAction.BUILD, 7, "changes", SHA,
    )  # fmt: skip
    for action, kind in (
        ("synchronize", RequestAction.BUILD),
        ("reopened", RequestAction.BUILD),
        ("closed", RequestAction.CLOSE),
        ("labeled", RequestAction.IGNORE),
    ):
        body = json.loads(samples.github_pull_request(action, 7, "changes", SHA))
        assert github.parse_pull_request(body).kind == kind
    for action, oldrev, kind in (
        ("open", None, RequestAction.BUILD),
        ("update", "b" * 40, RequestAction.BUILD),
        ("update", None, RequestAction.IGNORE),
        ("close", None, RequestAction.CLOSE),
        ("merge", None, RequestAction.CLOSE),
        ("approved", None, RequestAction.IGNORE),
    ):
        body = json.loads(
            samples.gitlab_merge_request(action, 3, "ms-viewport", SHA, oldrev=oldrev)
        )
        event = gitlab.parse_merge_request(body)
        assert (event.kind, event.number, event.branch) == (kind, 3, "ms-viewport")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"branch_include": ("",)}, "branch_include"),
        ({"branch_exclude": ("[abc",)}, "branch_exclude"),
        ({"watch_include": ("/src/**",)}, "watch_include"),
        ({"watch_exclude": ("a\nb",)}, "watch_exclude"),
        ({"watch_include": tuple(f"p{i}" for i in range(51))}, "watch_include"),
        ({"forge": "bitbucket"}, "forge"),
        ({"forge_repo": "acme/web"}, "forge"),
        ({"forge": "github", "forge_repo": "acme"}, "forge_repo"),
        ({"forge": "gitlab", "forge_repo": "x y"}, "forge_repo"),
        ({"forge": "github", "forge_api_url": "ftp://x"}, "forge_api_url"),
        # The forge token is sent to this base: only public APIs and the
        # operator's allow-list.
        ({"forge": "github", "forge_api_url": "https://attacker.example"}, "forge_api_url"),
        ({"forge": "gitlab", "forge_api_url": "https://api.github.com"}, "forge_api_url"),
    ],
)
def test_bad_forge_settings_name_their_field(changes: dict[str, object], field: str) -> None:
    settings = replace(ProjectSettings(name="web", repo_url="/r", build_command="make"), **changes)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as err:
        settings.validate(3600)
    assert err.value.field == field


def test_good_forge_settings_pass() -> None:
    ProjectSettings(
        name="web", repo_url="/r", build_command="make", forge="gitlab",
        forge_repo="group/sub/project", forge_api_url="https://gitlab.example.com/api/v4/",
        branch_include=("feature/**",), watch_exclude=("docs/",),
    ).validate(3600, frozenset({"https://gitlab.example.com/api/v4"}))  # fmt: skip
    ProjectSettings(
        name="web", repo_url="/r", build_command="make", forge="github", forge_repo="acme/web"
    ).validate(3600)


def test_build_states_become_commit_statuses() -> None:
    build = Build(
        id="b", project_id="p", account_id="a", branch="main", commit_sha=SHA,
        status=BuildStatus.QUEUED, created_at=NOW, production=False,
    )  # fmt: skip
    assert status_of(build) == (ForgeState.PENDING, "Preview queued")
    assert status_of(replace(build, status=BuildStatus.RUNNING, production=True)) == (
        ForgeState.RUNNING, "Build running",
    )  # fmt: skip
    failed = replace(build, status=BuildStatus.FAILED, status_reason="exit_code=2 in step build")
    assert status_of(failed) == (ForgeState.FAILURE, "Preview failed: exit_code=2 in step build")
    assert status_of(replace(build, status=BuildStatus.SUPERSEDED))[0] == ForgeState.CANCELED
    assert status_of(replace(build, status=BuildStatus.SUCCEEDED))[0] == ForgeState.SUCCESS
