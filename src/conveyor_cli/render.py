"""How the CLI shows projects and builds: JSON for --json, text otherwise."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import types_pb2 as pb


def rfc3339(ts: Timestamp) -> str | None:
    """RFC 3339 with milliseconds in UTC, or None for an unset timestamp."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    value = ts.ToDatetime(tzinfo=UTC)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rfc3339_ms(unix_ms: int) -> str:
    value = datetime.fromtimestamp(unix_ms / 1000, UTC)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def build_status(value: int) -> str:
    return _enum_name(pb.BuildStatus, value, "BUILD_STATUS_")


def step_json(step: pb.Step) -> dict[str, Any]:
    return {
        "name": step.name,
        "status": _enum_name(pb.StepStatus, step.status, "STEP_STATUS_"),
        "exit_code": step.exit_code if step.has_exit_code else None,
        "started_at": rfc3339(step.started_at),
        "finished_at": rfc3339(step.finished_at),
    }


def build_json(build: pb.Build) -> dict[str, Any]:
    return {
        "id": build.id,
        "project_id": build.project_id,
        "project": build.project_name,
        "branch": build.branch,
        "commit_sha": build.commit_sha,
        "status": build_status(build.status),
        "status_reason": build.status_reason,
        "trigger": build.trigger,
        "retry_of": build.retry_of or None,
        "production": build.production,
        "created_at": rfc3339(build.created_at),
        "started_at": rfc3339(build.started_at),
        "running_at": rfc3339(build.running_at),
        "finished_at": rfc3339(build.finished_at),
        "runner_id": build.runner_id or None,
        "warnings": list(build.warnings),
        "steps": [step_json(s) for s in build.steps],
    }


def project_json(project: pb.Project) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": project.id,
        "name": project.name,
        "repo_url": project.repo_url,
        "production_branch": project.production_branch,
        "build_command": project.build_command,
        "deploy_command": project.deploy_command,
        "preview_command": project.preview_command,
        "run_timeout_seconds": project.run_timeout_seconds,
        "cancel_in_progress": project.cancel_in_progress,
        "build_other_branches": project.build_other_branches,
        "root_directory": project.root_directory,
        "created_at": rfc3339(project.created_at),
        "updated_at": rfc3339(project.updated_at),
    }
    if project.webhook_secret:
        data["webhook_secret"] = project.webhook_secret
    return data


def project_text(data: dict[str, Any]) -> str:
    """``project_json``'s data as aligned ``key value`` lines: lists joined
    with commas, and the cache's switch and generation on one line."""
    lines = []
    for key, value in data.items():
        if key == "cache_generation":
            continue
        if key == "cache_disabled":
            key = "cache"
            state = "off" if value else "on"
            value = f"{state} (generation {data.get('cache_generation', 1)})"
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        lines.append(f"{key:<22} {value}")
    return "\n".join(lines)


def build_text(build: pb.Build) -> str:
    data = build_json(build)
    lines = [
        f"build      {data['id']}",
        f"project    {data['project']} ({data['project_id']})",
        f"commit     {data['commit_sha']} on {data['branch']}",
        f"status     {data['status']}"
        + (f" — {data['status_reason']}" if data["status_reason"] else ""),
        f"trigger    {data['trigger']}"
        + (f" (retry of {data['retry_of']})" if data["retry_of"] else ""),
        f"created    {data['created_at']}",
        f"started    {data['started_at'] or '-'}",
        f"finished   {data['finished_at'] or '-'}",
    ]
    for warning in data["warnings"]:
        lines.append(f"WARNING    {warning}")
    lines.append("steps")
    for step in data["steps"]:
        code = "" if step["exit_code"] is None else f" exit {step['exit_code']}"
        took = ""
        if step["started_at"] and step["finished_at"]:
            start = datetime.fromisoformat(step["started_at"].replace("Z", "+00:00"))
            end = datetime.fromisoformat(step["finished_at"].replace("Z", "+00:00"))
            took = f" in {(end - start).total_seconds():.2f} s"
        lines.append(f"  {step['name']:<10} {step['status']}{code}{took}")
    return "\n".join(lines)


def build_row(build: pb.Build) -> str:
    data = build_json(build)
    return (
        f"{data['id']}  {data['project']:<16} {data['branch']:<16} {data['commit_sha'][:10]}"
        f"  {data['status']:<12} {data['created_at']}"
    )
