"""How the CLI shows projects and builds: JSON for --json, text otherwise."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import config_service_pb2 as cs
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


# Statuses a build never leaves.
FINAL_STATUSES = frozenset(
    {
        pb.BUILD_STATUS_SUCCEEDED,
        pb.BUILD_STATUS_FAILED,
        pb.BUILD_STATUS_CANCELED,
        pb.BUILD_STATUS_TIMED_OUT,
        pb.BUILD_STATUS_ERRORED,
        pb.BUILD_STATUS_SUPERSEDED,
    }
)


def short_id(full_id: str) -> str:
    """An id as lists show it: its first 8 characters, which every command
    accepts as long as they are unique in the account."""
    return full_id[:8]


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
        "runner_sandbox": build.runner_sandbox or None,
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
    if data["runner_id"]:
        lines.append(
            f"runner     {data['runner_id']} (sandbox {data['runner_sandbox'] or 'unknown'})"
        )
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
        f"{short_id(data['id'])}  {data['project']:<16} {data['branch']:<16}"
        f" {data['commit_sha'][:10]}"
        f"  {data['status']:<12} {data['created_at']}"
    )


def runner_json(runner: cs.Runner) -> dict[str, Any]:
    return {
        "id": runner.id,
        "name": runner.name,
        "labels": list(runner.labels),
        "launcher": runner.launcher,
        "sandbox": runner.sandbox or None,
        "capacity": runner.capacity,
        "busy": runner.busy,
        "connected": runner.connected,
        "draining": runner.draining,
        "connected_at": rfc3339(runner.connected_at),
        "last_seen_at": rfc3339(runner.last_seen_at),
    }


def _ago(stamp: str | None, now: datetime) -> str:
    if stamp is None:
        return "never"
    seconds = (now - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()
    if seconds < 120:
        return f"{max(0, int(seconds))}s ago"
    if seconds < 7200:
        return f"{int(seconds // 60)}m ago"
    return f"{int(seconds // 3600)}h ago"


def runners_text(runners: list[dict[str, Any]], now: datetime) -> str:
    """``runner_json`` rows as a table, then a warning for each runner
    that runs builds without a sandbox."""
    if not runners:
        return "no runner has connected yet"
    lines = [
        f"{'ID':<8}  {'NAME':<20} {'STATE':<12} {'BUSY':>4}/{'CAP':<4} {'SANDBOX':<10}"
        f" {'LAUNCHER':<8} {'HEARTBEAT':<10} LABELS"
    ]
    for r in runners:
        state = "draining" if r["draining"] else "connected" if r["connected"] else "gone"
        lines.append(
            f"{short_id(r['id']):<8}  {r['name'][:20]:<20} {state:<12} {r['busy']:>4}/"
            f"{r['capacity']:<4} {r['sandbox'] or 'unknown':<10} {r['launcher']:<8}"
            f" {_ago(r['last_seen_at'], now):<10} {','.join(r['labels']) or '-'}"
        )
    for r in runners:
        if r["sandbox"] == "none":
            lines.append(
                f"WARNING runner {r['name']} runs builds WITHOUT a sandbox (--sandbox none)"
            )
    return "\n".join(lines)
