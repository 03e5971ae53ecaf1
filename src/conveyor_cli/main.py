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
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

# gRPC core prints a notice at every fork (the runner forks builds); the
# fork handlers are not needed because children exec at once.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from control.domain import project_fields
from conveyor_cli import backup, commands
from conveyor_cli.target import TargetError, resolve
from runner.config import RunnerSettings
from runner.launchers.base import Launcher, LaunchError

if TYPE_CHECKING:
    from runner.metrics import RunnerMetrics


JSON_HELP = "print JSON instead of text"


def _version() -> str:
    """The installed release of Conveyor, from its package metadata."""
    try:
        return metadata.version("conveyor")
    except metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


def _group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command with subcommands (``conveyor NAME SUB``)."""
    cmd = sub.add_parser(name, help=help_text, description=help_text)
    return cmd.add_subparsers(dest=f"{name.replace('-', '_')}_command", required=True)


def _cmd(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    *,
    json_flag: bool = True,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    cmd = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if json_flag:
        cmd.add_argument("--json", action="store_true", help=JSON_HELP)
    return cmd


BUILD_ID_HELP = "a build id, or a unique prefix of it (6+ characters, as `builds list` shows)"
PROJECT_HELP = "a project name, id, or unique id prefix (6+ characters)"
LOGS_EPILOG = """exit status:
  0  the log was printed (whatever the build's outcome), or, with --follow
     or --exit-status, the build succeeded
  1  the build ended otherwise (failed, canceled, timed out...) with --follow
     or --exit-status, or the control plane refused the request
  3  with --exit-status: the build has not ended yet
  141 the reader of the output went away (`conveyor logs ID | head`)

On a terminal, control sequences in the log other than colours (SGR) are
shown as ^[ and friends, never sent to the terminal; --raw prints the log as
stored."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conveyor", description="Conveyor CI/CD: push, build in a sandbox, deploy."
    )
    p.add_argument("--version", action="version", version=f"conveyor {_version()}")
    p.add_argument("--data-dir", help="data directory of `conveyor up` (or CONVEYOR_DATA_DIR)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = _cmd(
        sub, "up", "run everything on this machine: database, control plane, runner",
        json_flag=False,
    )  # fmt: skip
    up.add_argument("--data-dir", dest="up_data_dir", default=None, help="where state is kept")
    up.add_argument("--grpc-port", type=int, default=7070, help="gRPC port (0: a free one)")
    up.add_argument("--http-port", type=int, default=8080, help="HTTP port (0: a free one)")
    up.add_argument("--no-demo", action="store_true", help="do not create the demo project")
    up.add_argument("--capacity", type=int, default=6, help="builds the runner runs at once")
    up.add_argument("--log-format", choices=["json", "text"], default="text", help="log lines as")

    control = _group(sub, "control", "the control plane")
    serve = _cmd(
        control, "serve", "run the control plane (settings from CONVEYOR_*)", json_flag=False
    )
    serve.add_argument("--grpc-addr", default=None, help="HOST:PORT to serve gRPC on")
    serve.add_argument("--http-addr", default=None, help="HOST:PORT to serve HTTP on")
    serve.add_argument("--log-format", choices=["json", "text"], default=None, help="log lines as")

    runner = _group(sub, "runner", "a runner agent, which runs builds")
    start = _cmd(runner, "start", "run a runner agent", json_flag=False)
    start.add_argument(
        "--control",
        default=None,
        help="control plane gRPC address HOST:PORT, or its replicas' addresses separated by"
        " commas (or CONVEYOR_CONTROL_ADDR)",
    )
    start.add_argument("--token", default=None, help="runner token (or CONVEYOR_RUNNER_TOKEN)")
    start.add_argument("--capacity", type=int, default=None, help="builds it runs at once")
    start.add_argument(
        "--launcher", choices=["local", "nomad"], default=None, help="where builds run"
    )
    start.add_argument("--work-dir", default=None, help="workspaces, cache and the runner's id")
    start.add_argument("--metrics-addr", default=None, help="HOST:PORT for /metrics")
    start.add_argument(
        "--label", action="append", default=[], help="a label of the runner (repeatable)"
    )
    start.add_argument(
        "--sandbox",
        choices=["bubblewrap", "none"],
        default=None,
        help="local builds in bubblewrap (the default; the runner refuses to start without it)"
        " or, on purpose, in no sandbox at all",
    )
    start.add_argument(
        "--log-format", choices=["json", "text"], default="json", help="log lines as"
    )

    runners = _group(sub, "runners", "the build fleet")
    _cmd(
        runners, "list",
        "runners with labels, slots, last heartbeat, draining and sandbox; the account's queue",
    )  # fmt: skip

    projects = _group(sub, "projects", "projects: a repository and the commands that build it")
    create = _cmd(projects, "create", "create a project (its webhook secret is shown once)")
    _project_flags(create, on_create=True)
    _cmd(projects, "list", "the account's projects")
    show = _cmd(projects, "show", "one project's settings")
    show.add_argument("project", help=PROJECT_HELP)
    update = _cmd(projects, "update", "change the settings given; the others stay")
    update.add_argument("project", help=PROJECT_HELP)
    _project_flags(update, on_create=False)
    rotate_hook = _cmd(
        projects, "rotate-webhook-secret", "a new webhook secret (admin scope), shown once"
    )
    rotate_hook.add_argument("project", help=PROJECT_HELP)
    delete = _cmd(projects, "delete", "delete a project with its builds and logs")
    delete.add_argument("project", help=PROJECT_HELP)

    builds = _group(sub, "builds", "builds: trigger, list, show, cancel, retry")
    trigger = _cmd(builds, "trigger", "queue a build of a branch")
    trigger.add_argument("project", help=PROJECT_HELP)
    trigger.add_argument("--branch", default="", help="default: the production branch")
    trigger.add_argument("--commit", default="", help="40-hex commit (default: the branch head)")
    blist = _cmd(builds, "list", "builds, newest first, with short ids")
    blist.add_argument("--project", default="", help="only this project's (" + PROJECT_HELP + ")")
    blist.add_argument("--limit", type=int, default=50, help="at most this many (1-500)")
    blist.add_argument(
        "--all", action="store_true", help="also the pushes that did not build, and why"
    )
    for name, what in (
        ("show", "one build: status, steps, runner and its sandbox"),
        ("cancel", "cancel a build that has not ended"),
        ("retry", "queue a new build of a finished build's commit"),
    ):
        cmd = _cmd(builds, name, what)
        cmd.add_argument("build_id", help=BUILD_ID_HELP)

    env = _group(sub, "env", "project variables and secrets")
    env_set = _cmd(env, "set", "set a variable (value from stdin when omitted)")
    env_set.add_argument("project", help=PROJECT_HELP)
    env_set.add_argument("name", help="the variable's name")
    env_set.add_argument("value", nargs="?", help="its value (default: read from stdin)")
    env_set.add_argument("--secret", action="store_true", help="write-only, encrypted at rest")
    env_unset = _cmd(env, "unset", "remove a variable")
    env_unset.add_argument("project", help=PROJECT_HELP)
    env_unset.add_argument("name", help="the variable's name")
    env_list = _cmd(env, "list", "a project's variables (secrets show as ***)")
    env_list.add_argument("project", help=PROJECT_HELP)

    tokens = _group(sub, "tokens", "API tokens of the account (admin scope)")
    tcreate = _cmd(tokens, "create", "create a token (shown once)")
    tcreate.add_argument("name", help="what the token is for")
    tcreate.add_argument("--scopes", default="read", help="comma-separated: read,write,admin")
    _cmd(tokens, "list", "the account's tokens")
    trevoke = _cmd(tokens, "revoke", "revoke a token at once")
    trevoke.add_argument("token_id", help="a token id, or a unique prefix of it (6+ characters)")

    accounts = _group(sub, "accounts", "tenants of the installation (system scope)")
    acreate = _cmd(accounts, "create", "create an account and its first admin token")
    acreate.add_argument("name", help="the account's name")
    acreate.add_argument("--concurrency", type=int, default=6, help="its builds that run at once")

    audit = _cmd(sub, "audit", "the account's audit log (admin scope)")
    audit.add_argument("--limit", type=int, default=100, help="newest events to show (1-1000)")

    secrets_cmd = _group(sub, "secrets", "stored secrets (system scope)")
    _cmd(secrets_cmd, "rotate", "re-encrypt secrets under the current key")

    hooks = _group(sub, "hooks", "deploy hooks: URLs that build a branch")
    hcreate = _cmd(hooks, "create", "create a hook (its URL is shown once)")
    hcreate.add_argument("project", help=PROJECT_HELP)
    hcreate.add_argument("--name", required=True, help="what the hook is for")
    hcreate.add_argument("--branch", default="", help="default: the production branch")
    hlist = _cmd(hooks, "list", "a project's hooks")
    hlist.add_argument("project", help=PROJECT_HELP)
    hrevoke = _cmd(hooks, "revoke", "revoke a hook at once")
    hrevoke.add_argument("project", help=PROJECT_HELP)
    hrevoke.add_argument("hook_id", help="a hook id, or a unique prefix of it (6+ characters)")

    cache = _group(sub, "cache", "the build cache of a project")
    purge = _cmd(cache, "purge", "start a new cache generation: drop what was saved")
    purge.add_argument("project", help=PROJECT_HELP)

    logs = _cmd(sub, "logs", "print a build's log (exit status: see below)", epilog=LOGS_EPILOG)
    logs.add_argument("build_id", help=BUILD_ID_HELP)
    logs.add_argument(
        "--follow", "-f", action="store_true",
        help="keep printing until the build ends; exit 0 only if it succeeded",
    )  # fmt: skip
    logs.add_argument(
        "--cursor",
        default="",
        help="resume after this opaque cursor (from the API's StreamLogs or ReadLogs)",
    )
    logs.add_argument(
        "--exit-status", action="store_true",
        help="exit 0 only if the build succeeded (1: it ended otherwise, 3: not ended yet)",
    )  # fmt: skip
    logs.add_argument(
        "--raw", action="store_true",
        help="print the log as stored, control sequences and all, even on a terminal",
    )  # fmt: skip
    backup.add_parsers(sub)
    return p


def _project_flags(cmd: argparse.ArgumentParser, *, on_create: bool) -> None:
    """A flag per setting of ``project_fields.FIELDS``, in its order. On
    create a flag left out gives the field its ``create_default``; on update
    it leaves the field as it is (None), and a list flag replaces the list
    (given once as '' it empties it, or puts the defaults back)."""
    for f in project_fields.SETTINGS:
        option = f.create_option if on_create else f.flag
        kwargs: dict[str, Any] = {"help": (f.create_help if on_create else "") or f.help}
        if f.kind == "bool" and on_create:
            kwargs.update(action="store_true")
        elif f.kind == "bool":
            kwargs.update(choices=["on", "off"])
        elif f.kind == "globs":
            kwargs.update(action="append", metavar="GLOB", default=None)
        elif f.kind == "list":
            kwargs.update(metavar="LIST")
        else:
            if f.kind == "int":
                kwargs.update(type=int)
            if f.choices:
                kwargs.update(choices=list(f.choices))
            if on_create and option.startswith("--"):
                kwargs.update(default=f.create_default or ("" if f.kind == "text" else 0))
                if f.required:
                    kwargs.update(required=True)
        cmd.add_argument(option, **kwargs)


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
    ("runners", "list"): commands.runners_list,
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
    except BrokenPipeError:
        return _reader_gone()
    finally:
        client.channel.close()


def _reader_gone() -> int:
    """The output's reader went away (``conveyor logs ID | head``): stop
    quietly with the status of a tool killed by SIGPIPE, as ``cat`` would.
    stdout now points at /dev/null so the interpreter's last flush at exit
    cannot raise (and print) BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _up(args: argparse.Namespace) -> int:
    from common.logging_setup import configure
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
    from common.logging_setup import configure
    from common.settings import ConfigError
    from control.config import Settings
    from control.main import ControlPlane

    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
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

    from common.logging_setup import configure
    from common.tasks import cancel_and_wait
    from conveyor_cli.parent import die_with_parent
    from runner.agent import Agent, serve_metrics
    from runner.errors import WorkDirInUse
    from runner.identity import claim
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
            # The agent has stopped: a drain still waiting has nothing left to wait for.
            await cancel_and_wait(*drains)
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
