"""Bad input: every case gets its status code and a sentence naming the
field, and nothing stored changes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from psycopg import sql

from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import scheduler_service_pb2 as ss
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DENIED = grpc.StatusCode.PERMISSION_DENIED
MISSING = "00000000-0000-0000-0000-000000000000"


def create(**fields: Any) -> cs.CreateProjectRequest:
    base: dict[str, Any] = {
        "name": "ok-name",
        "repo_url": "https://example.com/acme/web.git",
        "production_branch": "main",
        "build_command": "make",
    }
    base.update(fields)
    return cs.CreateProjectRequest(**base)


Case = tuple[str, Callable[[Api], Any], grpc.StatusCode, str]

CASES: list[Case] = [
    (
        "empty name",
        lambda a: a.config.CreateProject(create(name=""), metadata=a.metadata),
        INVALID,
        "name",
    ),
    (
        "upper-case name",
        lambda a: a.config.CreateProject(create(name="Web"), metadata=a.metadata),
        INVALID,
        "name",
    ),
    (
        "long name",
        lambda a: a.config.CreateProject(create(name="a" * 64), metadata=a.metadata),
        INVALID,
        "name",
    ),
    (
        "ftp url",
        lambda a: a.config.CreateProject(create(repo_url="ftp://x/y"), metadata=a.metadata),
        INVALID,
        "repo_url",
    ),
    (
        "option url",
        lambda a: a.config.CreateProject(
            create(repo_url="--upload-pack=evil"), metadata=a.metadata
        ),
        INVALID,
        "repo_url",
    ),
    (
        "relative path",
        lambda a: a.config.CreateProject(create(repo_url="repo"), metadata=a.metadata),
        INVALID,
        "repo_url",
    ),
    (
        "branch with ..",
        lambda a: a.config.CreateProject(create(production_branch="a..b"), metadata=a.metadata),
        INVALID,
        "production_branch",
    ),
    (
        "branch with space",
        lambda a: a.config.CreateProject(create(production_branch="a b"), metadata=a.metadata),
        INVALID,
        "production_branch",
    ),
    (
        "huge command",
        lambda a: a.config.CreateProject(create(build_command="x" * 20_000), metadata=a.metadata),
        INVALID,
        "build_command",
    ),
    (
        "no commands",
        lambda a: a.config.CreateProject(create(build_command=""), metadata=a.metadata),
        INVALID,
        "build_command",
    ),
    (
        "timeout too long",
        lambda a: a.config.CreateProject(create(run_timeout_seconds=10**7), metadata=a.metadata),
        INVALID,
        "run_timeout_seconds",
    ),
    (
        "negative timeout",
        lambda a: a.config.CreateProject(create(run_timeout_seconds=-5), metadata=a.metadata),
        INVALID,
        "run_timeout_seconds",
    ),
    (
        "root escapes",
        lambda a: a.config.CreateProject(create(root_directory="../x"), metadata=a.metadata),
        INVALID,
        "root_directory",
    ),
    (
        "create lockfile escapes",
        lambda a: a.config.CreateProject(create(cache_lockfiles=["../x"]), metadata=a.metadata),
        INVALID,
        "cache_lockfiles",
    ),
    (
        "update lockfile escapes",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="existing",
                values=pb.Project(cache_lockfiles=["../x"]),
                update_mask=["cache_lockfiles"],
            ),
            metadata=a.metadata,
        ),
        INVALID,
        "cache_lockfiles",
    ),
    (
        "create lockfile in a subdirectory",
        lambda a: a.config.CreateProject(create(cache_lockfiles=["a/b"]), metadata=a.metadata),
        INVALID,
        "cache_lockfiles",
    ),
    (
        "update lockfile in a subdirectory",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="existing",
                values=pb.Project(cache_lockfiles=["a/b"]),
                update_mask=["cache_lockfiles"],
            ),
            metadata=a.metadata,
        ),
        INVALID,
        "cache_lockfiles",
    ),
    (
        "create cache path absolute",
        lambda a: a.config.CreateProject(create(cache_paths=["/etc"]), metadata=a.metadata),
        INVALID,
        "cache_paths",
    ),
    (
        "update cache path absolute",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="existing",
                values=pb.Project(cache_paths=["/etc"]),
                update_mask=["cache_paths"],
            ),
            metadata=a.metadata,
        ),
        INVALID,
        "cache_paths",
    ),
    (
        "create cache path escapes",
        lambda a: a.config.CreateProject(create(cache_paths=["../up"]), metadata=a.metadata),
        INVALID,
        "cache_paths",
    ),
    (
        "update cache path escapes",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="existing",
                values=pb.Project(cache_paths=["../up"]),
                update_mask=["cache_paths"],
            ),
            metadata=a.metadata,
        ),
        INVALID,
        "cache_paths",
    ),
    (
        "create cache path empty segment",
        lambda a: a.config.CreateProject(create(cache_paths=["a//b"]), metadata=a.metadata),
        INVALID,
        "cache_paths",
    ),
    (
        "update cache path empty segment",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="existing",
                values=pb.Project(cache_paths=["a//b"]),
                update_mask=["cache_paths"],
            ),
            metadata=a.metadata,
        ),
        INVALID,
        "cache_paths",
    ),
    (
        "create cache path other home",
        lambda a: a.config.CreateProject(create(cache_paths=["~root/x"]), metadata=a.metadata),
        INVALID,
        "cache_paths",
    ),
    (
        "update cache path other home",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="existing",
                values=pb.Project(cache_paths=["~root/x"]),
                update_mask=["cache_paths"],
            ),
            metadata=a.metadata,
        ),
        INVALID,
        "cache_paths",
    ),
    (
        "duplicate name",
        lambda a: a.config.CreateProject(create(name="existing"), metadata=a.metadata),
        grpc.StatusCode.ALREADY_EXISTS,
        "already exists",
    ),
    (
        "unknown project",
        lambda a: a.config.GetProject(cs.GetProjectRequest(project="nope"), metadata=a.metadata),
        NOT_FOUND,
        "project",
    ),
    (
        "empty project",
        lambda a: a.config.GetProject(cs.GetProjectRequest(project=""), metadata=a.metadata),
        INVALID,
        "project",
    ),
    (
        "update unknown field",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(project="existing", update_mask=["id"]), metadata=a.metadata
        ),
        INVALID,
        "update_mask",
    ),
    (
        "update empty mask",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(project="existing"), metadata=a.metadata
        ),
        INVALID,
        "update_mask",
    ),
    (
        "update bad url",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="existing",
                values=pb.Project(repo_url="gopher://x"),
                update_mask=["repo_url"],
            ),
            metadata=a.metadata,
        ),
        INVALID,
        "repo_url",
    ),
    (
        "update cache generation",
        lambda a: a.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="existing",
                values=pb.Project(cache_generation=7),
                update_mask=["cache_generation"],
            ),
            metadata=a.metadata,
        ),
        INVALID,
        "update_mask",
    ),
    (
        "purge unknown project",
        lambda a: a.config.PurgeCache(cs.PurgeCacheRequest(project="nope"), metadata=a.metadata),
        NOT_FOUND,
        "project",
    ),
    (
        "purge empty project",
        lambda a: a.config.PurgeCache(cs.PurgeCacheRequest(), metadata=a.metadata),
        INVALID,
        "project",
    ),
    (
        "trigger bad sha",
        lambda a: a.config.TriggerBuild(
            cs.TriggerBuildRequest(project="existing", commit_sha="abc"), metadata=a.metadata
        ),
        INVALID,
        "commit_sha",
    ),
    (
        "trigger bad branch",
        lambda a: a.config.TriggerBuild(
            cs.TriggerBuildRequest(project="existing", branch="-x", commit_sha="a" * 40),
            metadata=a.metadata,
        ),
        INVALID,
        "branch",
    ),
    (
        "trigger missing branch",
        lambda a: a.config.TriggerBuild(
            cs.TriggerBuildRequest(project="existing", branch="nope"), metadata=a.metadata
        ),
        INVALID,
        "branch",
    ),
    (
        "list limit",
        lambda a: a.config.ListBuilds(cs.ListBuildsRequest(limit=100_000), metadata=a.metadata),
        INVALID,
        "limit",
    ),
    (
        "build id not uuid",
        lambda a: a.config.GetBuild(
            cs.GetBuildRequest(build_id="1; DROP TABLE builds"), metadata=a.metadata
        ),
        NOT_FOUND,
        "build",
    ),
    (
        "missing build",
        lambda a: a.config.GetBuild(cs.GetBuildRequest(build_id=MISSING), metadata=a.metadata),
        NOT_FOUND,
        "build",
    ),
    (
        "cancel missing",
        lambda a: a.builds.CancelBuild(
            bm.CancelBuildRequest(build_id=MISSING), metadata=a.metadata
        ),
        NOT_FOUND,
        "build",
    ),
    (
        "cancel empty",
        lambda a: a.builds.CancelBuild(bm.CancelBuildRequest(), metadata=a.metadata),
        INVALID,
        "build_id",
    ),
    (
        "retry missing",
        lambda a: a.config.RetryBuild(cs.RetryBuildRequest(build_id=MISSING), metadata=a.metadata),
        NOT_FOUND,
        "build",
    ),
    (
        "env bad name",
        lambda a: a.config.SetEnvVar(
            cs.SetEnvVarRequest(project="existing", name="1BAD", value="x"), metadata=a.metadata
        ),
        INVALID,
        "name",
    ),
    (
        "env reserved",
        lambda a: a.config.SetEnvVar(
            cs.SetEnvVarRequest(project="existing", name="CONVEYOR_BUILD_ID", value="x"),
            metadata=a.metadata,
        ),
        INVALID,
        "reserved",
    ),
    (
        "env huge value",
        lambda a: a.config.SetEnvVar(
            cs.SetEnvVarRequest(project="existing", name="BIG", value="x" * 20_000),
            metadata=a.metadata,
        ),
        INVALID,
        "value",
    ),
    (
        "env NUL",
        lambda a: a.config.SetEnvVar(
            cs.SetEnvVarRequest(project="existing", name="NUL", value="a\0b"), metadata=a.metadata
        ),
        INVALID,
        "value",
    ),
    (
        "unset missing",
        lambda a: a.config.UnsetEnvVar(
            cs.UnsetEnvVarRequest(project="existing", name="NOPE"), metadata=a.metadata
        ),
        NOT_FOUND,
        "NOPE",
    ),
    (
        "token scope",
        lambda a: a.config.CreateToken(
            cs.CreateTokenRequest(name="t", scopes=["root"]), metadata=a.metadata
        ),
        INVALID,
        "scopes",
    ),
    (
        "revoke bad id",
        lambda a: a.config.RevokeToken(cs.RevokeTokenRequest(token_id="x"), metadata=a.metadata),
        INVALID,
        "token_id",
    ),
    (
        "revoke missing",
        lambda a: a.config.RevokeToken(
            cs.RevokeTokenRequest(token_id=MISSING), metadata=a.metadata
        ),
        NOT_FOUND,
        "token",
    ),
    (
        "account bad name",
        lambda a: a.config.CreateAccount(
            cs.CreateAccountRequest(name="Bad Name"), metadata=a.metadata
        ),
        INVALID,
        "name",
    ),
    (
        "account limit",
        lambda a: a.config.CreateAccount(
            cs.CreateAccountRequest(name="acme", concurrency_limit=5000), metadata=a.metadata
        ),
        INVALID,
        "concurrency_limit",
    ),
    (
        "audit limit",
        lambda a: a.config.ListAuditEvents(
            cs.ListAuditEventsRequest(limit=-1), metadata=a.metadata
        ),
        INVALID,
        "limit",
    ),
    ("bad cursor", lambda a: a.logs(MISSING, cursor="not-a-cursor"), NOT_FOUND, "build"),
    (
        "start build as user",
        lambda a: a.builds.StartBuild(bm.StartBuildRequest(build_id=MISSING), metadata=a.write_md),
        DENIED,
        "control plane",
    ),
    (
        "wake as user",
        lambda a: a.channel.unary_unary(
            "/conveyor.v1.SchedulerService/Wake",
            request_serializer=ss.WakeRequest.SerializeToString,
            response_deserializer=ss.WakeResponse.FromString,
        )(ss.WakeRequest(), metadata=a.write_md),
        DENIED,
        "control plane",
    ),
]


async def snapshot(control: ControlHandle) -> dict[str, str]:
    """A digest of every table's rows (audit_log aside: reads are not audited
    either, and a failed write must leave it unchanged too, so include it)."""
    out = {}
    async with control.plane.db.connection() as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        for (table,) in await cur.fetchall():
            query = sql.SQL(
                "SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {} t"
            )
            row = await (await conn.execute(query.format(sql.Identifier(table)))).fetchone()
            assert row is not None
            out[table] = row[0]
    return out


@pytest.fixture
async def prepared(control: ControlHandle, api: Api, repo: Path) -> Api:
    await api.create_project("existing", repo)
    token = await api.config.CreateToken(
        cs.CreateTokenRequest(name="writer", scopes=["write"]), metadata=api.metadata
    )
    api.write_md = (("authorization", f"Bearer {token.token}"),)  # type: ignore[attr-defined]
    return api


@pytest.mark.parametrize(("label", "call", "code", "mentions"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input_is_refused_and_changes_nothing(
    control: ControlHandle,
    prepared: Api,
    label: str,
    call: Callable[[Api], Any],
    code: grpc.StatusCode,
    mentions: str,
) -> None:
    before = await snapshot(control)
    with pytest.raises(aio.AioRpcError) as err:
        await call(prepared)
    assert err.value.code() == code, err.value.details()
    details = err.value.details() or ""
    assert mentions in details, details
    assert "Traceback" not in details
    assert await snapshot(control) == before


async def test_sixty_four_variables_of_five_kilobytes_fit(prepared: Api) -> None:
    for i in range(64):
        await prepared.config.SetEnvVar(
            cs.SetEnvVarRequest(project="existing", name=f"VAR_{i}", value="v" * 5000),
            metadata=prepared.metadata,
        )
    listed = await prepared.config.ListEnvVars(
        cs.ListEnvVarsRequest(project="existing"), metadata=prepared.metadata
    )
    assert len(listed.vars) == 64


async def test_a_message_over_the_size_limit_is_refused(prepared: Api) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await prepared.config.GetProject(
            cs.GetProjectRequest(project="x" * (17 * 1024 * 1024)), metadata=prepared.metadata
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_client_deadlines_are_honoured(prepared: Api) -> None:
    """A follow of a build that never starts ends at the client's deadline."""
    build = await prepared.trigger("existing", commit_sha="a" * 40)
    began = time.monotonic()
    with pytest.raises(aio.AioRpcError) as err:
        async for _ in prepared.builds.StreamLogs(
            bm.StreamLogsRequest(build_id=build.id, follow=True),
            metadata=prepared.metadata,
            timeout=0.5,
        ):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.4 < time.monotonic() - began < 3.0
