"""Per-project build-cache settings: stored, shown with their defaults,
updated and reset, handed to runners in the Assignment, and purged by a
generation bump that is audited and needs write scope."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st

from control.domain.cache import (
    DEFAULT_CACHE_LOCKFILES,
    DEFAULT_CACHE_PATHS,
    validate_cache_lockfiles,
    validate_cache_paths,
)
from control.errors import InvalidArgument
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner, cli

LOCKFILES = ["package-lock.json", "requirements-*.txt"]
PATHS = ["node_modules", "~/.cache/pip", "build/out"]


async def stored_row(control: ControlHandle, name: str) -> tuple[Any, ...]:
    async with control.plane.db.connection() as conn:
        cur = await conn.execute(
            "SELECT cache_disabled, cache_lockfiles, cache_paths, cache_generation"
            " FROM projects WHERE name = %s",
            (name,),
        )
        row = await cur.fetchone()
    assert row is not None
    return tuple(row)


async def update(api: Api, project: str, mask: list[str], **values: Any) -> pb.Project:
    reply = await api.config.UpdateProject(
        cs.UpdateProjectRequest(project=project, values=pb.Project(**values), update_mask=mask),
        metadata=api.metadata,
    )
    return reply.project


async def purge(api: Api, project: str) -> int:
    reply = await api.config.PurgeCache(
        cs.PurgeCacheRequest(project=project), metadata=api.metadata
    )
    return reply.generation


async def get(api: Api, project: str) -> pb.Project:
    reply = await api.config.GetProject(
        cs.GetProjectRequest(project=project), metadata=api.metadata
    )
    return reply.project


@pytest.mark.parametrize(
    "patterns",
    [(), DEFAULT_CACHE_LOCKFILES, ("Gemfile.lock", "[Pp]ipfile.lock", "go.su?", "a" * 128)],
)
def test_usable_lockfile_patterns_pass(patterns: tuple[str, ...]) -> None:
    validate_cache_lockfiles(patterns)


@pytest.mark.parametrize(
    ("patterns", "why"),
    [
        (("../x",), "hold no '/'"),
        (("a/b",), "hold no '/'"),
        (("",), "1-128"),
        (("a" * 129,), "1-128"),
        (("-rf",), "'-'"),
        ((".",), "'.'"),
        (("..",), "'..'"),
        (("a b",), "only letters"),
        (("$(id)",), "only letters"),
        (tuple(f"f{i}.lock" for i in range(21)), "at most 20"),
    ],
)
def test_bad_lockfile_patterns_are_refused(patterns: tuple[str, ...], why: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_cache_lockfiles(patterns)
    assert err.value.field == "cache_lockfiles"
    assert why in err.value.reason


@pytest.mark.parametrize(
    "paths",
    [
        (),
        DEFAULT_CACHE_PATHS,
        ("a/b/c", "~/.m2/repository", "node_modules/.cache", "x@1+2", "..hidden", "a" * 256),
    ],
)
def test_usable_cache_paths_pass(paths: tuple[str, ...]) -> None:
    validate_cache_paths(paths)


@pytest.mark.parametrize(
    ("paths", "why"),
    [
        (("/etc",), "must not start with '/'"),
        (("-x",), "must not start with '/' or '-'"),
        (("../up",), "a '..' segment"),
        (("a/../../b",), "a '..' segment"),
        (("./a",), "a '.' segment"),
        (("a//b",), "an empty segment"),
        (("~root/x",), "'~' may only start"),
        (("~",), "'~' may only start"),
        (("a/~/b",), "'~' may only start"),
        (("~/",), "an empty segment"),
        (("~//etc",), "must not start with '/'"),
        (("node_modules/",), "must not end with '/'"),
        (("a b",), "only letters"),
        (("$HOME/x",), "only letters"),
        (("",), "1-256"),
        (("a" * 257,), "1-256"),
        (("vendor", "vendor"), "listed twice"),
        (tuple(f"p{i}" for i in range(21)), "at most 20"),
    ],
)
def test_bad_cache_paths_are_refused(paths: tuple[str, ...], why: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_cache_paths(paths)
    assert err.value.field == "cache_paths"
    assert why in err.value.reason


@given(st.lists(st.text(alphabet="ab./~-@+*?[]", max_size=10), max_size=3))
def test_an_accepted_path_stays_inside_its_base(paths: list[str]) -> None:
    try:
        validate_cache_paths(tuple(paths))
    except InvalidArgument as exc:
        assert exc.field == "cache_paths"
        return
    for path in paths:
        rest = path.removeprefix("~/")
        assert "~" not in rest
        assert not rest.startswith("-")
        resolved = posixpath.normpath(posixpath.join("/base", rest))
        assert resolved.startswith("/base/"), path


@given(st.lists(st.text(alphabet="ab./~-*?[] $", max_size=10), max_size=3))
def test_an_accepted_lockfile_pattern_names_a_file_in_the_root(patterns: list[str]) -> None:
    try:
        validate_cache_lockfiles(tuple(patterns))
    except InvalidArgument as exc:
        assert exc.field == "cache_lockfiles"
        return
    for pattern in patterns:
        assert "/" not in pattern
        assert pattern not in ("", ".", "..")
        assert not pattern.startswith("-")
        assert posixpath.dirname(posixpath.join("/base", pattern)) == "/base"


async def test_a_new_project_shows_the_defaults_and_stores_none(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    created = await api.create_project("plain", repo)
    for project in (created, await get(api, "plain")):
        assert not project.cache_disabled
        assert tuple(project.cache_lockfiles) == DEFAULT_CACHE_LOCKFILES
        assert tuple(project.cache_paths) == DEFAULT_CACHE_PATHS
        assert project.cache_generation == 1
    # The defaults are not copied into the row: changing them later reaches
    # every project that never chose its own.
    assert await stored_row(control, "plain") == (False, [], [], 1)


async def test_custom_lists_are_stored_and_shown(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    created = await api.create_project(
        "custom", repo, cache_lockfiles=LOCKFILES, cache_paths=PATHS, cache_disabled=True
    )
    listed = await api.config.ListProjects(cs.ListProjectsRequest(), metadata=api.metadata)
    for project in (created, await get(api, created.id), *listed.projects):
        assert project.cache_disabled
        assert list(project.cache_lockfiles) == LOCKFILES
        assert list(project.cache_paths) == PATHS
    assert await stored_row(control, "custom") == (True, LOCKFILES, PATHS, 1)


async def test_update_changes_the_lists_and_an_empty_list_resets_them(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("upd", repo)
    changed = await update(
        api, "upd", ["cache_lockfiles", "cache_paths"], cache_lockfiles=LOCKFILES, cache_paths=PATHS
    )
    assert (list(changed.cache_lockfiles), list(changed.cache_paths)) == (LOCKFILES, PATHS)
    # A list not named in the mask is left alone.
    only_paths = await update(api, "upd", ["cache_paths"], cache_paths=["vendor"])
    assert (list(only_paths.cache_lockfiles), list(only_paths.cache_paths)) == (
        LOCKFILES,
        ["vendor"],
    )
    reset = await update(api, "upd", ["cache_lockfiles", "cache_paths"])
    assert tuple(reset.cache_lockfiles) == DEFAULT_CACHE_LOCKFILES
    assert tuple(reset.cache_paths) == DEFAULT_CACHE_PATHS
    assert await stored_row(control, "upd") == (False, [], [], 1)

    off = await update(api, "upd", ["cache_disabled"], cache_disabled=True)
    assert off.cache_disabled
    assert (await stored_row(control, "upd"))[0] is True
    on = await update(api, "upd", ["cache_disabled"], cache_disabled=False)
    assert not on.cache_disabled

    events = await api.config.ListAuditEvents(cs.ListAuditEventsRequest(), metadata=api.metadata)
    assert events.events[0].action == "project.update"
    assert events.events[0].details == "changed=cache_disabled"


async def test_the_cache_generation_cannot_be_set_through_an_update(
    control: ControlHandle, api: Api, repo: Path
) -> None:
    await api.create_project("gen", repo)
    with pytest.raises(aio.AioRpcError) as err:
        await update(api, "gen", ["cache_generation"], cache_generation=99)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in (err.value.details() or "")
    assert (await stored_row(control, "gen"))[3] == 1


async def test_purge_bumps_the_generation_and_is_audited(api: Api, repo: Path) -> None:
    project = await api.create_project("purged", repo)
    before = project.updated_at.ToDatetime()
    assert await purge(api, "purged") == 2
    assert await purge(api, project.id) == 3
    shown = await get(api, "purged")
    assert shown.cache_generation == 3
    assert shown.updated_at.ToDatetime() > before
    # The other project of the account is untouched.
    assert (await api.create_project("bystander", repo)).cache_generation == 1
    assert await purge(api, "purged") == 4
    assert (await get(api, "bystander")).cache_generation == 1

    events = await api.config.ListAuditEvents(cs.ListAuditEventsRequest(), metadata=api.metadata)
    purges = [(e.actor, e.target, e.details) for e in events.events if e.action == "cache.purge"]
    assert purges == [
        ("admin", "project purged", "generation=4"),
        ("admin", "project purged", "generation=3"),
        ("admin", "project purged", "generation=2"),
    ]


async def test_purge_of_a_missing_project_is_not_found(api: Api) -> None:
    for ref in ("nope", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(aio.AioRpcError) as err:
            await purge(api, ref)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "project" in (err.value.details() or "")
    with pytest.raises(aio.AioRpcError) as err:
        await purge(api, "")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_purge_needs_the_write_scope(control: ControlHandle, api: Api, repo: Path) -> None:
    await api.create_project("scoped", repo)
    tokens = {}
    for scope in ("read", "write"):
        reply = await api.config.CreateToken(
            cs.CreateTokenRequest(name=f"ci-{scope}", scopes=[scope]), metadata=api.metadata
        )
        tokens[scope] = reply.token
    reader = Api(control.plane.grpc_address, tokens["read"])
    writer = Api(control.plane.grpc_address, tokens["write"])
    try:
        with pytest.raises(aio.AioRpcError) as err:
            await purge(reader, "scoped")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (await stored_row(control, "scoped"))[3] == 1
        # The reader still sees the settings; a write token may purge.
        assert (await get(reader, "scoped")).cache_generation == 1
        assert await purge(writer, "scoped") == 2
    finally:
        await reader.close()
        await writer.close()


async def test_the_assignment_carries_the_effective_cache_settings(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    await api.create_project(
        "cached",
        repo,
        production_branch="release",
        cache_lockfiles=LOCKFILES,
        cache_paths=PATHS,
    )
    assert await purge(api, "cached") == 2

    build = await api.trigger("cached", commit_sha="a" * 40)
    a = await proto_runner.next_assignment()
    assert a.build_id == build.id
    assert (list(a.cache_lockfiles), list(a.cache_paths)) == (LOCKFILES, PATHS)
    assert (a.production_branch, a.cache_generation, a.production) == ("release", 2, True)

    preview = await api.trigger("cached", branch="feature/x", commit_sha="b" * 40)
    b = await proto_runner.next_assignment()
    assert b.build_id == preview.id
    assert (b.production_branch, b.cache_generation, b.production) == ("release", 2, False)
    assert (list(b.cache_lockfiles), list(b.cache_paths)) == (LOCKFILES, PATHS)

    # Disabled: both lists empty (the runner's "cache off"); the generation
    # stays, so turning the cache back on restores what was saved.
    await update(api, "cached", ["cache_disabled"], cache_disabled=True)
    off = await api.trigger("cached", commit_sha="c" * 40)
    c = await proto_runner.next_assignment()
    assert c.build_id == off.id
    assert (list(c.cache_lockfiles), list(c.cache_paths)) == ([], [])
    assert (c.production_branch, c.cache_generation, c.production) == ("release", 2, True)


async def test_a_project_without_lists_hands_out_the_defaults(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    await api.create_project("defaults", repo)
    build = await api.trigger("defaults", commit_sha="d" * 40)
    a = await proto_runner.next_assignment()
    assert a.build_id == build.id
    assert tuple(a.cache_lockfiles) == DEFAULT_CACHE_LOCKFILES
    assert tuple(a.cache_paths) == DEFAULT_CACHE_PATHS
    assert (a.production_branch, a.cache_generation, a.production) == ("main", 1, True)


async def test_the_cli_sets_shows_resets_and_purges_the_cache(
    control: ControlHandle, repo: Path
) -> None:
    code, out, err = await cli(
        control, "projects", "create", "web", "--repo", str(repo),
        "--build-command", "bash build.sh", "--no-cache",
        "--cache-lockfiles", "package-lock.json,requirements-*.txt",
        "--cache-paths", "node_modules,~/.cache/pip,build/out", "--json",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert (data["cache_disabled"], data["cache_generation"]) == (True, 1)
    assert (data["cache_lockfiles"], data["cache_paths"]) == (LOCKFILES, PATHS)

    code, out, err = await cli(control, "projects", "show", "web")
    assert code == 0, err
    lines = {line[:22].strip(): line[23:] for line in out.splitlines()}
    assert lines["cache"] == "off (generation 1)"
    assert lines["cache_lockfiles"] == "package-lock.json, requirements-*.txt"
    assert lines["cache_paths"] == "node_modules, ~/.cache/pip, build/out"

    code, out, err = await cli(
        control, "projects", "update", "web", "--cache", "on", "--cache-lockfiles", "", "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["cache_disabled"] is False
    assert tuple(data["cache_lockfiles"]) == DEFAULT_CACHE_LOCKFILES
    assert data["cache_paths"] == PATHS

    code, out, err = await cli(control, "cache", "purge", "web")
    assert code == 0, err
    assert out.strip() == "cache of web purged: builds now use generation 2"
    code, out, err = await cli(control, "cache", "purge", "web", "--json")
    assert code == 0, err
    assert json.loads(out) == {"project": "web", "generation": 3}

    code, out, err = await cli(control, "projects", "update", "web", "--cache-paths", "/etc")
    assert code == 1
    assert "INVALID_ARGUMENT" in err
    assert "cache_paths" in err
    code, _, err = await cli(control, "cache", "purge", "nope")
    assert code == 1
    assert "NOT_FOUND" in err
