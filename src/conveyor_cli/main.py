"""The `conveyor` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# gRPC core prints a notice at every fork (the runner forks builds); the
# fork handlers are not needed because children exec at once.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from conveyor_cli import backup, commands
from conveyor_cli.target import TargetError, resolve
from runner.config import RunnerSettings
from runner.launchers.base import Launcher, LaunchError

if TYPE_CHECKING:
    from runner.metrics import RunnerMetrics


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conveyor", description="Conveyor CI/CD")
    p.add_argument("--data-dir", help="data directory of `conveyor up` (or CONVEYOR_DATA_DIR)")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run everything on this machine")
    up.add_argument("--data-dir", dest="up_data_dir", default=None)
    up.add_argument("--grpc-port", type=int, default=7070)
    up.add_argument("--http-port", type=int, default=8080)
    up.add_argument("--no-demo", action="store_true")
    up.add_argument("--capacity", type=int, default=6)
    up.add_argument("--log-format", choices=["json", "text"], default="text")

    control = sub.add_parser("control").add_subparsers(dest="control_command", required=True)
    serve = control.add_parser("serve", help="run the control plane")
    serve.add_argument("--grpc-addr", default=None)
    serve.add_argument("--http-addr", default=None)
    serve.add_argument("--log-format", choices=["json", "text"], default=None)

    runner = sub.add_parser("runner").add_subparsers(dest="runner_command", required=True)
    start = runner.add_parser("start", help="run a runner agent")
    start.add_argument("--control", default=None, help="control plane gRPC address HOST:PORT")
    start.add_argument("--token", default=None, help="runner token (or CONVEYOR_RUNNER_TOKEN)")
    start.add_argument("--capacity", type=int, default=None)
    start.add_argument("--launcher", choices=["local", "nomad"], default=None)
    start.add_argument("--work-dir", default=None)
    start.add_argument("--metrics-addr", default=None)
    start.add_argument("--label", action="append", default=[])
    start.add_argument(
        "--sandbox",
        choices=["bubblewrap", "none"],
        default=None,
        help="local builds in bubblewrap (the default; the runner refuses to start without it)"
        " or, on purpose, in no sandbox at all",
    )
    start.add_argument("--log-format", choices=["json", "text"], default="json")

    projects = sub.add_parser("projects").add_subparsers(dest="projects_command", required=True)
    create = projects.add_parser("create")
    create.add_argument("name")
    create.add_argument("--repo", required=True)
    create.add_argument("--production-branch", default="main")
    create.add_argument("--build-command", default="")
    create.add_argument("--deploy-command", default="")
    create.add_argument("--preview-command", default="")
    create.add_argument("--run-timeout", type=int, default=0)
    create.add_argument("--root-directory", default="")
    create.add_argument("--cancel-in-progress", action="store_true")
    create.add_argument(
        "--no-network", action="store_true", help="run the project's builds without network"
    )
    create.add_argument("--production-only", action="store_true")
    create.add_argument("--no-cache", action="store_true", help="build without the build cache")
    create.add_argument(
        "--fork-secrets",
        action="store_true",
        help="give builds of pull requests from forks the project's secrets and preview step",
    )
    _cache_flags(create)
    _forge_flags(create)
    create.add_argument("--json", action="store_true")
    lst = projects.add_parser("list")
    lst.add_argument("--json", action="store_true")
    show = projects.add_parser("show")
    show.add_argument("project")
    show.add_argument("--json", action="store_true")
    update = projects.add_parser("update")
    update.add_argument("project")
    update.add_argument("--name")
    update.add_argument("--repo")
    update.add_argument("--production-branch")
    update.add_argument("--build-command")
    update.add_argument("--deploy-command")
    update.add_argument("--preview-command")
    update.add_argument("--run-timeout", type=int)
    update.add_argument("--root-directory")
    update.add_argument("--cancel-in-progress", choices=["on", "off"])
    update.add_argument("--network", choices=["on", "off"], help="network access of builds")
    update.add_argument(
        "--other-branches", choices=["on", "off"], help="build branches besides production"
    )
    update.add_argument("--cache", choices=["on", "off"], help="the build cache of builds")
    update.add_argument(
        "--fork-secrets",
        choices=["on", "off"],
        help="secrets and the preview step for builds of pull requests from forks",
    )
    _cache_flags(update)
    _forge_flags(update, defaults=None)
    update.add_argument("--json", action="store_true")
    rotate_hook = projects.add_parser(
        "rotate-webhook-secret", help="a new webhook secret (admin scope), shown once"
    )
    rotate_hook.add_argument("project")
    rotate_hook.add_argument("--json", action="store_true")
    delete = projects.add_parser("delete")
    delete.add_argument("project")
    delete.add_argument("--json", action="store_true")

    builds = sub.add_parser("builds").add_subparsers(dest="builds_command", required=True)
    trigger = builds.add_parser("trigger")
    trigger.add_argument("project")
    trigger.add_argument("--branch", default="")
    trigger.add_argument("--commit", default="")
    trigger.add_argument("--json", action="store_true")
    blist = builds.add_parser("list")
    blist.add_argument("--project", default="")
    blist.add_argument("--limit", type=int, default=50)
    blist.add_argument(
        "--all", action="store_true", help="also the pushes that did not build, and why"
    )
    blist.add_argument("--json", action="store_true")
    for name in ("show", "cancel", "retry"):
        cmd = builds.add_parser(name)
        cmd.add_argument("build_id")
        cmd.add_argument("--json", action="store_true")

    env = sub.add_parser("env", help="project variables and secrets").add_subparsers(
        dest="env_command", required=True
    )
    env_set = env.add_parser("set", help="set a variable (value from stdin when omitted)")
    env_set.add_argument("project")
    env_set.add_argument("name")
    env_set.add_argument("value", nargs="?")
    env_set.add_argument("--secret", action="store_true", help="write-only, encrypted at rest")
    env_set.add_argument("--json", action="store_true")
    env_unset = env.add_parser("unset")
    env_unset.add_argument("project")
    env_unset.add_argument("name")
    env_unset.add_argument("--json", action="store_true")
    env_list = env.add_parser("list")
    env_list.add_argument("project")
    env_list.add_argument("--json", action="store_true")

    tokens = sub.add_parser("tokens").add_subparsers(dest="tokens_command", required=True)
    tcreate = tokens.add_parser("create")
    tcreate.add_argument("name")
    tcreate.add_argument("--scopes", default="read", help="comma-separated: read,write,admin")
    tcreate.add_argument("--json", action="store_true")
    tlist = tokens.add_parser("list")
    tlist.add_argument("--json", action="store_true")
    trevoke = tokens.add_parser("revoke")
    trevoke.add_argument("token_id")
    trevoke.add_argument("--json", action="store_true")

    accounts = sub.add_parser("accounts").add_subparsers(dest="accounts_command", required=True)
    acreate = accounts.add_parser("create")
    acreate.add_argument("name")
    acreate.add_argument("--concurrency", type=int, default=6)
    acreate.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", help="the account's audit log")
    audit.add_argument("--limit", type=int, default=100)
    audit.add_argument("--json", action="store_true")

    secrets_cmd = sub.add_parser("secrets").add_subparsers(dest="secrets_command", required=True)
    rotate = secrets_cmd.add_parser("rotate", help="re-encrypt secrets under the current key")
    rotate.add_argument("--json", action="store_true")

    hooks = sub.add_parser("hooks", help="deploy hooks: URLs that build a branch").add_subparsers(
        dest="hooks_command", required=True
    )
    hcreate = hooks.add_parser("create", help="create a hook (its URL is shown once)")
    hcreate.add_argument("project")
    hcreate.add_argument("--name", required=True)
    hcreate.add_argument("--branch", default="", help="default: the production branch")
    hcreate.add_argument("--json", action="store_true")
    hlist = hooks.add_parser("list")
    hlist.add_argument("project")
    hlist.add_argument("--json", action="store_true")
    hrevoke = hooks.add_parser("revoke")
    hrevoke.add_argument("project")
    hrevoke.add_argument("hook_id")
    hrevoke.add_argument("--json", action="store_true")

    cache = sub.add_parser("cache", help="the build cache of a project").add_subparsers(
        dest="cache_command", required=True
    )
    purge = cache.add_parser("purge", help="start a new cache generation: drop what was saved")
    purge.add_argument("project")
    purge.add_argument("--json", action="store_true")

    logs = sub.add_parser("logs")
    logs.add_argument("build_id")
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("--cursor", default="")
    logs.add_argument("--json", action="store_true")
    backup.add_parsers(sub)
    return p


def _cache_flags(cmd: argparse.ArgumentParser) -> None:
    """Comma-separated cache lists; an empty string means the defaults."""
    cmd.add_argument(
        "--cache-lockfiles",
        metavar="LIST",
        help="file-name globs in the root directory whose contents key the cache"
        " ('' for the defaults)",
    )
    cmd.add_argument(
        "--cache-paths",
        metavar="LIST",
        help="paths saved after a successful build, relative to the root directory"
        " or starting with ~/ ('' for the defaults)",
    )


def _forge_flags(cmd: argparse.ArgumentParser, defaults: str | None = "") -> None:
    """Branch rules, watch paths and forge coordinates. On update, a list
    flag replaces the list (given once as '' it empties it)."""
    for flag, what in (
        ("--branch-include", "build only other branches matching GLOB"),
        ("--branch-exclude", "never build branches matching GLOB (wins over include)"),
        ("--watch-include", "build only when a changed file matches GLOB"),
        ("--watch-exclude", "ignore changed files matching GLOB"),
    ):
        cmd.add_argument(flag, action="append", metavar="GLOB", default=None, help=what)
    cmd.add_argument("--forge", choices=["github", "gitlab"], default=defaults)
    cmd.add_argument("--forge-api-url", default=defaults, help="e.g. https://api.github.com")
    cmd.add_argument("--forge-repo", default=defaults, help="owner/repo, or a GitLab project id")


CLIENT_COMMANDS: dict[tuple[str, str | None], Callable[..., int]] = {
    ("projects", "create"): commands.projects_create,
    ("projects", "list"): commands.projects_list,
    ("projects", "show"): commands.projects_show,
    ("projects", "update"): commands.projects_update,
    ("projects", "delete"): commands.projects_delete,
    ("projects", "rotate-webhook-secret"): commands.projects_rotate_webhook_secret,
    ("builds", "trigger"): commands.builds_trigger,
    ("builds", "list"): commands.builds_list,
    ("builds", "show"): commands.builds_show,
    ("builds", "cancel"): commands.builds_cancel,
    ("builds", "retry"): commands.builds_retry,
    ("logs", None): commands.logs,
    ("env", "set"): commands.env_set,
    ("env", "unset"): commands.env_unset,
    ("env", "list"): commands.env_list,
    ("tokens", "create"): commands.tokens_create,
    ("tokens", "list"): commands.tokens_list,
    ("tokens", "revoke"): commands.tokens_revoke,
    ("accounts", "create"): commands.accounts_create,
    ("audit", None): commands.audit,
    ("secrets", "rotate"): commands.secrets_rotate,
    ("hooks", "create"): commands.hooks_create,
    ("hooks", "list"): commands.hooks_list,
    ("hooks", "revoke"): commands.hooks_revoke,
    ("cache", "purge"): commands.cache_purge,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "up":
        return _up(args)
    if args.command == "control":
        return _control_serve(args)
    if args.command == "runner":
        return _runner_start(args)
    if args.command in ("backup", "restore"):
        return backup.run(args)
    sub = getattr(args, f"{args.command}_command", None)
    handler = CLIENT_COMMANDS[(args.command, sub)]
    try:
        target = resolve(args.data_dir)
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = commands.Client(target)
    try:
        return handler(client, args)
    except grpc.RpcError as exc:
        print(commands.rpc_error_message(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.channel.close()


def _up(args: argparse.Namespace) -> int:
    from control.logging_setup import configure
    from conveyor_cli.up import run_up

    data_dir = args.up_data_dir or args.data_dir or os.environ.get("CONVEYOR_DATA_DIR")
    if not data_dir:
        print("error: conveyor up needs --data-dir DIR (or CONVEYOR_DATA_DIR)", file=sys.stderr)
        return 2
    configure("conveyor-up", args.log_format, logging.INFO)
    return asyncio.run(
        run_up(
            Path(data_dir), args.grpc_port, args.http_port, demo=not args.no_demo,
            log_format=args.log_format, capacity=args.capacity,
        )
    )  # fmt: skip


def _control_serve(args: argparse.Namespace) -> int:
    from control.config import Settings
    from control.errors import InvalidArgument
    from control.logging_setup import configure
    from control.main import ControlPlane

    try:
        settings = Settings.from_env(os.environ)
    except InvalidArgument as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    changes: dict[str, object] = {}
    if args.grpc_addr:
        changes["grpc_addr"] = args.grpc_addr
    if args.http_addr:
        changes["http_addr"] = args.http_addr
    if args.log_format:
        changes["log_format"] = args.log_format
    settings = settings.with_(**changes)
    if not settings.database_url:
        print("error: set CONVEYOR_DATABASE_URL to a PostgreSQL URL", file=sys.stderr)
        return 2
    configure("conveyor-control", settings.log_format)

    async def serve() -> None:
        plane = ControlPlane(settings)
        await plane.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await plane.stop()

    asyncio.run(serve())
    return 0


def _runner_start(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from control.logging_setup import configure
    from conveyor_cli.parent import die_with_parent
    from runner.agent import Agent, serve_metrics
    from runner.identity import WorkDirInUse, claim
    from runner.metrics import RunnerMetrics

    die_with_parent(os.environ)
    try:
        settings = RunnerSettings.from_env(
            os.environ,
            control_addr=args.control,
            token=args.token,
            capacity=args.capacity,
            launcher=args.launcher,
            work_dir=Path(args.work_dir) if args.work_dir else None,
            metrics_addr=args.metrics_addr,
            labels=tuple(args.label),
            sandbox=args.sandbox,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure("conveyor-runner", args.log_format)
    try:
        # Held until exit: one agent per work directory, same id each start.
        identity = claim(settings.work_dir)
    except (WorkDirInUse, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Archives a runner that died left waiting for their upload: no build
    # runs yet, so all of them.
    shutil.rmtree(settings.cache_staging, ignore_errors=True)
    try:
        cache = settings.open_cache(os.environ)
    except (ValueError, OSError) as exc:
        print(f"error: build cache: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        metrics = RunnerMetrics(CollectorRegistry())
        try:
            launcher, sandboxed = _launcher(settings, metrics)
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        agent = Agent(
            settings, launcher, metrics, sandboxed=sandboxed, cache=cache,
            runner_id=identity.runner_id,
        )  # fmt: skip
        http = (
            await serve_metrics(metrics, settings.metrics_addr) if settings.metrics_addr else None
        )
        loop = asyncio.get_running_loop()
        drains: set[asyncio.Task[None]] = set()

        def on_signal() -> None:
            task = asyncio.create_task(agent.drain())
            drains.add(task)
            task.add_done_callback(drains.discard)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await agent.run()
        finally:
            if http is not None:
                await http.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def _launcher(settings: RunnerSettings, metrics: RunnerMetrics) -> tuple[Launcher, bool]:
    from runner.launchers.local import LocalLauncher

    if settings.launcher == "nomad":
        from runner.launchers.nomad import NomadLauncher, NomadSettings

        return NomadLauncher(NomadSettings.from_env(os.environ)), True
    local = LocalLauncher(
        settings.work_dir / "workspaces",
        metrics=metrics,
        protected=(settings.cache_root, settings.cache_staging),
        user_network=False if settings.build_network == "host" else None,
        sandbox=settings.sandbox != "none",
    )
    return local, local.sandboxed


if __name__ == "__main__":
    sys.exit(main())
