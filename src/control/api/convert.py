"""Maps domain types to protobuf messages and back. The only module of the
control plane besides the servicers that touches generated stubs."""

from __future__ import annotations

from dataclasses import MISSING
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from control.domain import project_fields
from control.domain.build import Build, BuildStatus, Step, StepStatus
from control.domain.cache import effective_lockfiles, effective_paths
from control.domain.project import Project, ProjectSettings
from control.domain.runner import RunnerInfo
from control.storage.accounts import Account, TokenInfo
from control.storage.audit import AuditEvent
from control.storage.env import EnvVar
from control.storage.hooks import DeployHook
from control.storage.logs import StoredLine
from control.storage.pushes import SkippedPush
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb

BUILD_STATUS_TO_PB = {
    BuildStatus.QUEUED: pb.BUILD_STATUS_QUEUED,
    BuildStatus.INITIALIZING: pb.BUILD_STATUS_INITIALIZING,
    BuildStatus.RUNNING: pb.BUILD_STATUS_RUNNING,
    BuildStatus.SUCCEEDED: pb.BUILD_STATUS_SUCCEEDED,
    BuildStatus.FAILED: pb.BUILD_STATUS_FAILED,
    BuildStatus.CANCELED: pb.BUILD_STATUS_CANCELED,
    BuildStatus.TIMED_OUT: pb.BUILD_STATUS_TIMED_OUT,
    BuildStatus.ERRORED: pb.BUILD_STATUS_ERRORED,
    BuildStatus.SUPERSEDED: pb.BUILD_STATUS_SUPERSEDED,
}
BUILD_STATUS_FROM_PB = {v: k for k, v in BUILD_STATUS_TO_PB.items()}

STEP_STATUS_TO_PB = {
    StepStatus.PENDING: pb.STEP_STATUS_PENDING,
    StepStatus.RUNNING: pb.STEP_STATUS_RUNNING,
    StepStatus.SUCCEEDED: pb.STEP_STATUS_SUCCEEDED,
    StepStatus.FAILED: pb.STEP_STATUS_FAILED,
    StepStatus.SKIPPED: pb.STEP_STATUS_SKIPPED,
    StepStatus.CANCELED: pb.STEP_STATUS_CANCELED,
}
STEP_STATUS_FROM_PB = {v: k for k, v in STEP_STATUS_TO_PB.items()}

STREAM_TO_PB = {
    "stdout": pb.LOG_STREAM_STDOUT,
    "stderr": pb.LOG_STREAM_STDERR,
    "system": pb.LOG_STREAM_SYSTEM,
}
STREAM_FROM_PB = {v: k for k, v in STREAM_TO_PB.items()}


def timestamp(value: datetime | None, into: Timestamp) -> None:
    if value is not None:
        into.FromDatetime(value)


def from_timestamp(value: Timestamp) -> datetime | None:
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime(tzinfo=UTC)


# What clients see of the cache lists: the defaults when none were set,
# as builds use them.
_SHOWN = {"cache_lockfiles": effective_lockfiles, "cache_paths": effective_paths}


def project_to_pb(project: Project, *, with_secret: bool) -> pb.Project:
    """Every field of ``project_fields.FIELDS``; the webhook secret only
    with ``with_secret`` (the answers of create and rotation)."""
    msg = pb.Project()
    for f in project_fields.FIELDS:
        value = getattr(project, f.name)
        if f.name == "webhook_secret" and not with_secret:
            continue
        if f.kind == "time":
            timestamp(value, getattr(msg, f.name))
        elif f.kind in ("globs", "list"):
            getattr(msg, f.name).extend(_SHOWN.get(f.name, tuple)(value))
        else:
            setattr(msg, f.name, value)
    return msg


def settings_from_pb(msg: cs.CreateProjectRequest) -> ProjectSettings:
    """The settings of a create request: every settable field of
    ``project_fields.FIELDS``, a field left unset (or, without presence,
    at its zero value) taking ``ProjectSettings``' default."""
    defaults = {
        f.name: f.default for f in dataclass_fields(ProjectSettings) if f.default is not MISSING
    }
    # The generic type: HasField of the generated class takes literals only.
    generic: Message = msg
    values: dict[str, Any] = {}
    for f in project_fields.FIELDS:
        if not f.settable:
            continue
        value: Any = getattr(msg, f.name)
        if f.kind in ("globs", "list"):
            values[f.name] = tuple(value)
        elif msg.DESCRIPTOR.fields_by_name[f.name].has_presence:
            values[f.name] = value if generic.HasField(f.name) else defaults[f.name]
        else:
            values[f.name] = value or defaults.get(f.name, value)
    return ProjectSettings(**values)


def step_to_pb(step: Step) -> pb.Step:
    msg = pb.Step(
        name=step.name,
        status=STEP_STATUS_TO_PB[step.status],
        exit_code=step.exit_code or 0,
        has_exit_code=step.exit_code is not None,
    )
    timestamp(step.started_at, msg.started_at)
    timestamp(step.finished_at, msg.finished_at)
    return msg


def build_to_pb(build: Build) -> pb.Build:
    msg = pb.Build(
        id=build.id,
        project_id=build.project_id,
        branch=build.branch,
        commit_sha=build.commit_sha,
        status=BUILD_STATUS_TO_PB[build.status],
        status_reason=build.status_reason,
        trigger=build.trigger,
        retry_of=build.retry_of or "",
        production=build.production,
        steps=[step_to_pb(s) for s in build.steps],
        runner_id=build.runner_id or "",
        project_name=build.project_name,
        warnings=list(build.warnings),
        runner_sandbox=build.runner_sandbox,
    )
    timestamp(build.created_at, msg.created_at)
    timestamp(build.started_at, msg.started_at)
    timestamp(build.running_at, msg.running_at)
    timestamp(build.finished_at, msg.finished_at)
    return msg


def runner_to_pb(runner: RunnerInfo) -> cs.Runner:
    out = cs.Runner(
        id=runner.id,
        name=runner.name,
        labels=runner.labels,
        launcher=runner.launcher,
        capacity=runner.capacity,
        busy=runner.busy,
        connected=runner.connected,
        draining=runner.draining,
        sandbox=runner.sandbox,
    )
    timestamp(runner.connected_at, out.connected_at)
    timestamp(runner.last_seen_at, out.last_seen_at)
    return out


def line_to_pb(line: StoredLine) -> pb.LogLine:
    msg = pb.LogLine(number=line.number, stream=STREAM_TO_PB[line.stream], text=line.text)
    msg.time.FromMilliseconds(line.time_ms)
    return msg


def skipped_push_to_pb(push: SkippedPush) -> cs.SkippedPush:
    msg = cs.SkippedPush(
        id=push.id,
        project_id=push.project_id,
        project_name=push.project_name,
        provider=push.provider,
        event=push.event,
        ref=push.ref,
        branch=push.branch,
        commit_sha=push.commit_sha,
        reason=push.reason,
        delivery_id=push.delivery_id,
    )
    timestamp(push.received_at, msg.received_at)
    return msg


def deploy_hook_to_pb(hook: DeployHook) -> cs.DeployHook:
    msg = cs.DeployHook(id=hook.id, project_id=hook.project_id, name=hook.name, branch=hook.branch)
    timestamp(hook.created_at, msg.created_at)
    timestamp(hook.last_used_at, msg.last_used_at)
    timestamp(hook.revoked_at, msg.revoked_at)
    return msg


def env_var_to_pb(var: EnvVar) -> cs.ProjectEnvVar:
    msg = cs.ProjectEnvVar(name=var.name, value=var.value, secret=var.secret)
    msg.updated_at.FromDatetime(var.updated_at)
    return msg


def token_to_pb(info: TokenInfo) -> cs.Token:
    msg = cs.Token(id=info.id, name=info.name, scopes=list(info.scopes))
    timestamp(info.created_at, msg.created_at)
    timestamp(info.revoked_at, msg.revoked_at)
    return msg


def account_to_pb(account: Account) -> cs.Account:
    msg = cs.Account(id=account.id, name=account.name, concurrency_limit=account.concurrency_limit)
    timestamp(account.created_at, msg.created_at)
    return msg


def audit_event_to_pb(event: AuditEvent) -> cs.AuditEvent:
    msg = cs.AuditEvent(
        actor=event.actor, action=event.action, target=event.target, details=event.details
    )
    timestamp(event.at, msg.time)
    return msg
