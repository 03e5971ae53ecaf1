"""What a client written from the protos alone relies on: zero values mean
the documented defaults, FieldMask updates, streams that end with the
build's status, and a reason on every final state."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio

from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, RunnerProcess, git


async def test_unset_build_other_branches_means_true(api: Api, repo: Path) -> None:
    reply = await api.config.CreateProject(
        cs.CreateProjectRequest(name="defaults", repo_url=str(repo), build_command="make"),
        metadata=api.metadata,
    )
    assert reply.project.build_other_branches is True
    reply = await api.config.CreateProject(
        cs.CreateProjectRequest(
            name="prod-only", repo_url=str(repo), build_command="make", build_other_branches=False
        ),
        metadata=api.metadata,
    )
    assert reply.project.build_other_branches is False


async def test_update_takes_a_field_mask(api: Api, repo: Path) -> None:
    await api.create_project("masked", repo)
    values = pb.Project(build_command="make", deploy_command="ignored")
    reply = await api.config.UpdateProject(
        cs.UpdateProjectRequest(
            project="masked", values=values, mask=FieldMask(paths=["build_command"])
        ),
        metadata=api.metadata,
    )
    assert reply.project.build_command == "make"
    assert reply.project.deploy_command == "echo deployed"
    with pytest.raises(aio.AioRpcError) as caught:
        await api.config.UpdateProject(
            cs.UpdateProjectRequest(
                project="masked",
                values=values,
                mask=FieldMask(paths=["build_command"]),
                update_mask=["build_command"],
            ),
            metadata=api.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mask" in (caught.value.details() or "")
    with pytest.raises(aio.AioRpcError) as caught:
        await api.config.UpdateProject(
            cs.UpdateProjectRequest(project="masked", values=values, mask=FieldMask(paths=["id"])),
            metadata=api.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def last_message(api: Api, build_id: str, *, follow: bool) -> bm.StreamLogsResponse:
    last = bm.StreamLogsResponse()
    async for message in api.builds.StreamLogs(
        bm.StreamLogsRequest(build_id=build_id, follow=follow), metadata=api.metadata
    ):
        last = message
    return last


async def test_every_stream_ends_with_the_status_and_success_has_a_reason(
    api: Api, runner: RunnerProcess, repo: Path
) -> None:
    await api.create_project("ends", repo)
    queued = await api.trigger("ends", branch="nowhere", commit_sha=git(repo, "rev-parse", "HEAD"))
    await api.cancel(queued.id)
    build = await api.trigger("ends", commit_sha=git(repo, "rev-parse", "HEAD"))
    done = await api.wait_status(build.id)
    assert done.status == pb.BUILD_STATUS_SUCCEEDED, done.status_reason
    assert done.status_reason == "every step succeeded"

    end = await last_message(api, build.id, follow=False)
    assert end.status == pb.BUILD_STATUS_SUCCEEDED
    assert end.complete is True
    assert not end.lines
    end = await last_message(api, build.id, follow=True)
    assert end.status == pb.BUILD_STATUS_SUCCEEDED
    assert end.complete is True
    end = await last_message(api, queued.id, follow=False)
    assert end.status == pb.BUILD_STATUS_CANCELED
    assert end.complete is True
