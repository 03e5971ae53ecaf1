"""The client commands: projects, builds and logs, over the gRPC API."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

import grpc

from control.domain import project_fields
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import build_manager_pb2_grpc as bm_grpc
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc as cs_grpc
from conveyor.v1 import types_pb2 as pb
from conveyor_cli import render, terminal
from conveyor_cli.target import Target

TIMEOUT = 30.0
PACKED_STREAMS = {"o": "stdout", "e": "stderr", "s": "system"}


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


class Client:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.channel = target.channel()
        self.config = cs_grpc.ConfigServiceStub(self.channel)
        self.builds = bm_grpc.BuildManagerStub(self.channel)

    def call(self, method: Any, request: Any) -> Any:
        return method(request, metadata=self.target.metadata, timeout=TIMEOUT)


def projects_create(client: Client, args: argparse.Namespace) -> int:
    """A request with every setting of ``project_fields.SETTINGS``: a bool's
    switch turns it from its ``create_default``, a list flag left out is
    the empty list."""
    settings: dict[str, Any] = {}
    for f in project_fields.SETTINGS:
        given = getattr(args, f.create_dest)
        if f.kind == "bool":
            settings[f.name] = not f.create_default if given else bool(f.create_default)
        else:
            settings[f.name] = _field_value(f, given)
    reply = client.call(client.config.CreateProject, cs.CreateProjectRequest(**settings))
    data = project_json(reply.project)
    if args.json:
        _print_json(data)
    else:
        print(f"project {data['name']} created: {data['id']}")
        print(f"webhook secret: {data['webhook_secret']}\n(shown once: store it now)")
    return 0


def projects_rotate_webhook_secret(client: Client, args: argparse.Namespace) -> int:
    """A new webhook secret (admin scope), shown once; the old one stops
    verifying deliveries at once."""
    reply = client.call(
        client.config.RotateWebhookSecret, cs.RotateWebhookSecretRequest(project=args.project)
    )
    data = project_json(reply.project)
    if args.json:
        _print_json(
            {"id": data["id"], "name": data["name"], "webhook_secret": data["webhook_secret"]}
        )
    else:
        print(f"new webhook secret of {data['name']}: {data['webhook_secret']}")
        print("(shown once: store it now, and set it in the forge's webhook settings)")
    return 0


def projects_list(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.ListProjects, cs.ListProjectsRequest())
    if args.json:
        _print_json([project_json(p) for p in reply.projects])
    else:
        for p in reply.projects:
            print(f"{p.id}  {p.name:<20} {p.repo_url}  ({p.production_branch})")
    return 0


def projects_show(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.GetProject, cs.GetProjectRequest(project=args.project))
    data = project_json(reply.project)
    if args.json:
        _print_json(data)
    else:
        print(render.project_text(data))
    return 0


def _globs(values: list[str] | None) -> list[str]:
    return [v for v in values or [] if v]


def _comma_list(value: str | None) -> list[str]:
    """``a,b`` as a list; None or '' as the empty list (the defaults)."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _field_value(field: project_fields.ProjectField, given: Any) -> Any:
    """A flag's value as ``field``'s proto value: globs without the ''
    that empties a list, a comma-separated list split."""
    if field.kind == "globs":
        return _globs(given)
    if field.kind == "list":
        return _comma_list(given)
    return given


def project_json(project: pb.Project) -> dict[str, Any]:
    """``render.project_json`` and the forge integration's settings."""
    data = render.project_json(project)
    data.update(
        branch_include=list(project.branch_include),
        branch_exclude=list(project.branch_exclude),
        watch_include=list(project.watch_include),
        watch_exclude=list(project.watch_exclude),
        forge=project.forge,
        forge_api_url=project.forge_api_url,
        forge_repo=project.forge_repo,
        network_isolated=project.network_isolated,
        cache_disabled=project.cache_disabled,
        cache_lockfiles=list(project.cache_lockfiles),
        cache_paths=list(project.cache_paths),
        cache_generation=project.cache_generation,
        fork_secrets=project.fork_secrets,
    )
    return data


def projects_update(client: Client, args: argparse.Namespace) -> int:
    values = pb.Project()
    mask = []
    for f in project_fields.SETTINGS:
        given = getattr(args, f.dest)
        if given is None:
            continue
        if f.kind == "bool":
            setattr(values, f.name, (given == "on") != f.inverted)
        elif f.kind in ("globs", "list"):
            # An empty list in the update puts the defaults back.
            getattr(values, f.name).extend(_field_value(f, given))
        else:
            setattr(values, f.name, given)
        mask.append(f.name)
    reply = client.call(
        client.config.UpdateProject,
        cs.UpdateProjectRequest(project=args.project, values=values, update_mask=mask),
    )
    data = project_json(reply.project)
    if args.json:
        _print_json(data)
    else:
        print(f"project {data['name']} updated")
    return 0


def projects_delete(client: Client, args: argparse.Namespace) -> int:
    client.call(client.config.DeleteProject, cs.DeleteProjectRequest(project=args.project))
    if args.json:
        _print_json({"deleted": args.project})
    else:
        print(f"project {args.project} deleted")
    return 0


def builds_trigger(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(
        client.config.TriggerBuild,
        cs.TriggerBuildRequest(project=args.project, branch=args.branch, commit_sha=args.commit),
    )
    return _show_build(reply.build, args.json)


def builds_list(client: Client, args: argparse.Namespace) -> int:
    """Builds, newest first; with --all, the pushes that did not build too,
    each with its reason, merged by time."""
    reply = client.call(
        client.config.ListBuilds,
        cs.ListBuildsRequest(project=args.project, limit=args.limit, include_skipped=args.all),
    )
    rows: list[tuple[str, dict[str, Any], str]] = [
        (render.rfc3339(b.created_at) or "", render.build_json(b), render.build_row(b))
        for b in reply.builds
    ]
    for push in reply.skipped:
        data = _skipped_json(push)
        rows.append((data["created_at"] or "", data, _skipped_row(data)))
    rows.sort(key=lambda row: row[0], reverse=True)
    if args.json:
        _print_json([data for _, data, _ in rows])
    else:
        for _, _, text in rows:
            print(text)
    return 0


def _skipped_json(push: cs.SkippedPush) -> dict[str, Any]:
    tag = push.ref.removeprefix("refs/tags/") if push.ref.startswith("refs/tags/") else None
    return {
        "id": push.id,
        "project_id": push.project_id,
        "project": push.project_name,
        "branch": None if tag is not None else push.branch or push.ref,
        "tag": tag,
        "commit_sha": push.commit_sha,
        "status": "skipped",
        "status_reason": push.reason,
        "trigger": f"{push.provider} {push.event}",
        "created_at": render.rfc3339(push.received_at),
        "delivery_id": push.delivery_id or None,
    }


def _skipped_row(data: dict[str, Any]) -> str:
    where = f"tag {data['tag']}" if data["tag"] is not None else data["branch"]
    return (
        f"{render.short_id(data['id'])}  {data['project']:<16} {where:<16}"
        f" {data['commit_sha'][:10]:<10}"
        f"  {'skipped':<12} {data['created_at']}  {data['status_reason']}"
    )


def runners_list(client: Client, args: argparse.Namespace) -> int:
    """The fleet (every runner of the installation) and the caller's
    account's queue."""
    reply = client.call(client.config.ListRunners, cs.ListRunnersRequest())
    runners = [render.runner_json(r) for r in reply.runners]
    queue = {"queued": reply.queued, "active": reply.active, "limit": reply.limit}
    if args.json:
        _print_json({"runners": runners, "queue": queue})
        return 0
    print(render.runners_text(runners, now=datetime.now(UTC)))
    print(
        f"queue: {queue['queued']} queued, {queue['active']} running"
        f" of this account's limit {queue['limit']}"
    )
    return 0


def builds_show(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.GetBuild, cs.GetBuildRequest(build_id=args.build_id))
    return _show_build(reply.build, args.json)


def builds_cancel(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.builds.CancelBuild, bm.CancelBuildRequest(build_id=args.build_id))
    return _show_build(reply.build, args.json)


def builds_retry(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.RetryBuild, cs.RetryBuildRequest(build_id=args.build_id))
    return _show_build(reply.build, args.json)


def _show_build(build: pb.Build, as_json: bool) -> int:
    if as_json:
        _print_json(render.build_json(build))
    else:
        print(render.build_text(build))
    return 0


# Exit status of `conveyor logs --exit-status` for a build that has not
# ended: not 1, so a script tells "still running" from "failed".
NOT_ENDED = 3


def logs(client: Client, args: argparse.Namespace) -> int:
    """Print the log; with --follow, until the build ends.

    Exit status (the command's epilog documents it): 0 once the log was
    printed, like ``docker logs``, so ``conveyor logs ID | grep`` works in a
    ``set -o pipefail`` script whatever the build did. With --follow or
    --exit-status it mirrors the build instead, as ``gh run view
    --exit-status`` does: 0 only if it succeeded, 1 if it ended otherwise,
    ``NOT_ENDED`` if it has not ended (without --follow).

    On a terminal every control sequence but colours is neutralised (see
    ``terminal.for_terminal``); --raw and pipes get the text as stored.
    """
    stream = client.builds.StreamLogs(
        bm.StreamLogsRequest(
            build_id=args.build_id, follow=args.follow, cursor=args.cursor, packed=True
        ),
        metadata=client.target.metadata,
    )
    final = pb.BUILD_STATUS_UNSPECIFIED
    out = sys.stdout
    shown = terminal.for_terminal if out.isatty() and not args.raw else None
    for message in stream:
        if message.packed:
            records = message.packed.decode().split("\n")
            if args.json:
                for offset, record in enumerate(records):
                    ts, code, text = record.split("\t", 2)
                    out.write(
                        json.dumps(
                            {
                                "number": message.first_line + offset,
                                "time": render.rfc3339_ms(int(ts)),
                                "stream": PACKED_STREAMS[code],
                                "text": text,
                            }
                        )
                        + "\n"
                    )
            else:
                texts = [r.split("\t", 2)[2] for r in records]
                if shown is not None:
                    texts = [shown(t) for t in texts]
                out.write("\n".join(texts) + "\n")
        out.flush()
        if message.status:
            final = message.status
    if not (args.follow or args.exit_status):
        return 0
    if final != pb.BUILD_STATUS_UNSPECIFIED:
        print(f"build {render.build_status(final)}", file=sys.stderr)
    if final == pb.BUILD_STATUS_SUCCEEDED:
        return 0
    if not args.follow and final not in render.FINAL_STATUSES:
        return NOT_ENDED
    return 1


def rpc_error_message(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "ERROR"
    return f"error: {name}: {details}"


def env_set(client: Client, args: argparse.Namespace) -> int:
    value = args.value
    if value is None:
        # Read from stdin so a secret never sits in shell history or argv.
        value = sys.stdin.read().removesuffix("\n")
    reply = client.call(
        client.config.SetEnvVar,
        cs.SetEnvVarRequest(project=args.project, name=args.name, value=value, secret=args.secret),
    )
    if args.json:
        _print_json(_env_json(reply.var))
    else:
        kind = "secret" if reply.var.secret else "variable"
        print(f"{kind} {reply.var.name} set on {args.project}")
    return 0


def env_unset(client: Client, args: argparse.Namespace) -> int:
    client.call(
        client.config.UnsetEnvVar, cs.UnsetEnvVarRequest(project=args.project, name=args.name)
    )
    if args.json:
        _print_json({"unset": args.name})
    else:
        print(f"{args.name} unset on {args.project}")
    return 0


def env_list(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.ListEnvVars, cs.ListEnvVarsRequest(project=args.project))
    if args.json:
        _print_json([_env_json(v) for v in reply.vars])
    else:
        for var in reply.vars:
            print(f"{var.name}={'*** (secret)' if var.secret else var.value}")
    return 0


def _env_json(var: cs.ProjectEnvVar) -> dict[str, Any]:
    return {
        "name": var.name,
        "secret": var.secret,
        "value": None if var.secret else var.value,
        "updated_at": render.rfc3339(var.updated_at),
    }


def _token_json(token: cs.Token) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "scopes": list(token.scopes),
        "created_at": render.rfc3339(token.created_at),
        "revoked_at": render.rfc3339(token.revoked_at),
    }


def tokens_create(client: Client, args: argparse.Namespace) -> int:
    scopes = [s for s in args.scopes.split(",") if s]
    reply = client.call(
        client.config.CreateToken, cs.CreateTokenRequest(name=args.name, scopes=scopes)
    )
    if args.json:
        _print_json({**_token_json(reply.info), "token": reply.token})
    else:
        print(f"token {reply.info.name} ({reply.info.id}), scopes {','.join(reply.info.scopes)}")
        print(f"{reply.token}\n(shown once: store it now)")
    return 0


def tokens_list(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.ListTokens, cs.ListTokensRequest())
    if args.json:
        _print_json([_token_json(t) for t in reply.tokens])
    else:
        for t in reply.tokens:
            state = "revoked" if render.rfc3339(t.revoked_at) else "active"
            print(f"{t.id}  {t.name:<20} {','.join(t.scopes):<16} {state}")
    return 0


def tokens_revoke(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.RevokeToken, cs.RevokeTokenRequest(token_id=args.token_id))
    if args.json:
        _print_json(_token_json(reply.info))
    else:
        print(f"token {reply.info.name} revoked")
    return 0


def accounts_create(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(
        client.config.CreateAccount,
        cs.CreateAccountRequest(name=args.name, concurrency_limit=args.concurrency),
    )
    data = {
        "id": reply.account.id,
        "name": reply.account.name,
        "concurrency_limit": reply.account.concurrency_limit,
        "created_at": render.rfc3339(reply.account.created_at),
        "admin_token": reply.admin_token,
    }
    if args.json:
        _print_json(data)
    else:
        print(f"account {data['name']} created: {data['id']}")
        print(f"admin token (shown once): {data['admin_token']}")
    return 0


def audit(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.ListAuditEvents, cs.ListAuditEventsRequest(limit=args.limit))
    events = [
        {
            "time": render.rfc3339(e.time),
            "actor": e.actor,
            "action": e.action,
            "target": e.target,
            "details": e.details,
        }
        for e in reply.events
    ]
    if args.json:
        _print_json(events)
    else:
        for e in events:
            print(f"{e['time']}  {e['actor']:<12} {e['action']:<16} {e['target']}  {e['details']}")
    return 0


def secrets_rotate(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.RotateSecrets, cs.RotateSecretsRequest())
    if args.json:
        _print_json({"reencrypted": reply.reencrypted, "key_id": reply.key_id})
    else:
        print(f"re-encrypted {reply.reencrypted} secret(s) under key {reply.key_id}")
    return 0


def _hook_json(hook: cs.DeployHook) -> dict[str, Any]:
    return {
        "id": hook.id,
        "project_id": hook.project_id,
        "name": hook.name,
        "branch": hook.branch,
        "created_at": render.rfc3339(hook.created_at),
        "last_used_at": render.rfc3339(hook.last_used_at),
        "revoked_at": render.rfc3339(hook.revoked_at),
    }


def hooks_create(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(
        client.config.CreateDeployHook,
        cs.CreateDeployHookRequest(project=args.project, name=args.name, branch=args.branch),
    )
    if args.json:
        _print_json({**_hook_json(reply.hook), "key": reply.key, "url": reply.url})
    else:
        print(f"deploy hook {reply.hook.name} ({reply.hook.id}) builds {reply.hook.branch}")
        print(f"POST {reply.url}\n(shown once: store it now)")
    return 0


def hooks_list(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(
        client.config.ListDeployHooks, cs.ListDeployHooksRequest(project=args.project)
    )
    if args.json:
        _print_json([_hook_json(h) for h in reply.hooks])
    else:
        for hook in reply.hooks:
            data = _hook_json(hook)
            state = "revoked" if data["revoked_at"] else "active"
            used = data["last_used_at"] or "never used"
            print(f"{hook.id}  {hook.name:<20} {hook.branch:<16} {state:<8} {used}")
    return 0


def hooks_revoke(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(
        client.config.RevokeDeployHook,
        cs.RevokeDeployHookRequest(project=args.project, hook_id=args.hook_id),
    )
    if args.json:
        _print_json(_hook_json(reply.hook))
    else:
        print(f"deploy hook {reply.hook.name} revoked")
    return 0


def cache_purge(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(client.config.PurgeCache, cs.PurgeCacheRequest(project=args.project))
    if args.json:
        _print_json({"project": args.project, "generation": reply.generation})
    else:
        print(f"cache of {args.project} purged: builds now use generation {reply.generation}")
    return 0
