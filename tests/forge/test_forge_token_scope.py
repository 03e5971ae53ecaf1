"""The forge token is the control plane's: builds never see it."""

from __future__ import annotations

from pathlib import Path

from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ProtocolRunner


async def test_builds_get_every_secret_but_the_forge_token(
    api: Api, proto_runner: ProtocolRunner, repo: Path
) -> None:
    await api.create_project("tokens", repo)
    for name in ("FORGE_TOKEN", "DEPLOY_KEY"):
        await api.config.SetEnvVar(
            cs.SetEnvVarRequest(project="tokens", name=name, value=f"v-{name}", secret=True),
            metadata=api.metadata,
        )
    build = await api.trigger("tokens")
    assignment = await proto_runner.next_assignment()
    assert assignment.build_id == build.id
    assert {e.name: e.value for e in assignment.env} == {"DEPLOY_KEY": "v-DEPLOY_KEY"}
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
