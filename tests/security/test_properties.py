"""Property-based tests: parsers and validators either accept or raise the
documented error, whatever they are given."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from control.domain import cursor
from control.domain.env import validate_var
from control.domain.project import ProjectSettings
from control.errors import InvalidArgument
from control.webhooks import github, gitlab
from control.webhooks.push import PayloadError, PushEvent

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=20,
)
sha = st.text(alphabet="0123456789abcdef", min_size=40, max_size=40)
branch_name = st.from_regex(r"[a-z][a-z0-9/_-]{0,30}[a-z0-9]", fullmatch=True)


@given(st.integers(min_value=0, max_value=10**15))
def test_cursor_round_trips(n: int) -> None:
    assert cursor.decode(cursor.encode(n)) == n


@given(st.text(max_size=100))
def test_cursor_decoding_accepts_or_names_the_field(text: str) -> None:
    try:
        value = cursor.decode(text)
    except InvalidArgument as exc:
        assert exc.field == "cursor"
    else:
        assert value >= 0


@given(json_values)
def test_push_parsers_accept_or_raise_payload_error(value: object) -> None:
    for parse in (github.parse_push, gitlab.parse_push):
        try:
            event = parse(value)
        except PayloadError as exc:
            assert str(exc)
        else:
            assert isinstance(event, PushEvent)
            assert event.ref
            assert event.commit_sha


@given(branch_name, sha, st.text(max_size=50))
def test_github_push_payloads_give_branch_and_commit(branch: str, after: str, message: str) -> None:
    payload = json.loads(
        json.dumps(
            {"ref": f"refs/heads/{branch}", "after": after, "head_commit": {"message": message}}
        )
    )
    event = github.parse_push(payload)
    assert (event.branch, event.commit_sha, event.head_message) == (branch, after, message)
    assert not event.is_tag


@given(branch_name, sha)
def test_gitlab_push_payloads_give_branch_and_checkout_sha(branch: str, checkout: str) -> None:
    event = gitlab.parse_push(
        {"ref": f"refs/heads/{branch}", "after": "f" * 40, "checkout_sha": checkout}
    )
    assert (event.branch, event.commit_sha) == (branch, checkout)


@settings(max_examples=300)
@given(
    name=st.text(max_size=70),
    repo_url=st.text(max_size=80),
    branch=st.text(max_size=40),
    command=st.text(max_size=60),
    timeout=st.integers(min_value=-10, max_value=10**6),
    root=st.text(max_size=30),
)
def test_project_validation_accepts_or_names_a_field(
    name: str, repo_url: str, branch: str, command: str, timeout: int, root: str
) -> None:
    settings_ = ProjectSettings(
        name=name,
        repo_url=repo_url,
        production_branch=branch,
        build_command=command,
        run_timeout_seconds=timeout,
        root_directory=root,
    )
    try:
        settings_.validate(6 * 3600)
    except InvalidArgument as exc:
        assert exc.field in {
            "name", "repo_url", "production_branch", "build_command", "run_timeout_seconds",
            "root_directory",
        }  # fmt: skip
    else:
        assert name
        assert name == name.lower()
        assert 1 <= timeout <= 6 * 3600
        assert ".." not in root.split("/")
        assert not repo_url.startswith("-")


@given(st.text(max_size=140), st.text(max_size=200))
def test_env_validation_accepts_or_names_a_field(name: str, value: str) -> None:
    try:
        validate_var(name, value)
    except InvalidArgument as exc:
        assert exc.field in {"name", "value"}
    else:
        assert name.isascii()
        assert not name.startswith("CONVEYOR_")
        assert "\0" not in value
