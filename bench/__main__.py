"""`python -m bench`: Conveyor's benchmark suite (issue 7), one command.

Runs the selected parts against real Conveyor processes (an embedded
PostgreSQL, `conveyor up` or `conveyor control serve`, real runner agents or
runner-protocol clients), then, with ``--peer``, Buildbot 4.3 on the same
machine; prints one table and writes docs/benchmarks.md. ``--quick`` is a
smoke run with small sizes (it writes no document unless ``--doc`` is given).
Exit status: 0 when every part ran (missed targets included), 1 when a part
failed, 2 for bad arguments.
"""

from __future__ import annotations

import os

# The bench forks git and Conveyor processes while gRPC threads run; gRPC's
# fork handlers are not needed (children exec at once) and only warn.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import grpc
import psycopg

from bench import (
    buildbot_peer,
    burst,
    cache,
    dashboard,
    live_tail,
    log_ingest,
    push_latency,
    scale,
    scheduler,
)
from bench.context import Context
from bench.figures import Figure, PartResult
from bench.processes import BenchError, Postgres
from bench.report import code_under_test, exported, machine, markdown, table

REPO = Path(__file__).resolve().parent.parent
PARTS = ("push", "logs", "tail", "scheduler", "burst", "scale", "cache", "dashboard")
MODULES: dict[str, ModuleType] = {
    "push": push_latency,
    "logs": log_ingest,
    "tail": live_tail,
    "scheduler": scheduler,
    "burst": burst,
    "scale": scale,
    "cache": cache,
    "dashboard": dashboard,
}
# (full run, --quick) defaults of every size.
SIZES: dict[str, tuple[Any, Any]] = {
    "builds": (50, 5),
    "warmup": (5, 2),
    "log_lines": (1_000_000, 100_000),
    "log_runs": (3, 1),
    "followers": ("1,500", "1,50"),
    "tail_seconds": (20.0, 5.0),
    "tail_rate": (10.0, 10.0),
    "sched_builds": (10_000, 1_000),
    "sched_accounts": (100, 20),
    "burst": (50, 20),
    "scale_builds": (1000, 200),
    "scale_runners": (50, 10),
    "scale_window": (30.0, 10.0),
    "cache_rounds": (3, 1),
    "web_log_lines": (1_000_000, 100_000),
    "web_page_runs": (5, 2),
    "web_live_lines": (300, 30),
    "sse_followers": (200, 20),
    "sse_seconds": (20.0, 5.0),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    p.add_argument("--peer", action="store_true", help="also run Buildbot (needs PyPI once)")
    p.add_argument(
        "--commit",
        default=None,
        help="measure this commit's src/ (exported with git archive) instead of the work tree",
    )
    p.add_argument("--peer-harness", type=Path, default=buildbot_peer.DEFAULT_HARNESS)
    p.add_argument("--doc", type=Path, default=None, help="where to write the document")
    p.add_argument("--no-doc", action="store_true", help="write no document")
    p.add_argument("--json", type=Path, default=None, help="also write every raw figure here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--profile", type=Path, default=None, help="py-spy profiles of Conveyor go here")
    sizes = p.add_argument_group("sizes (default: the issue's; --quick: small)")
    sizes.add_argument("--builds", type=int, help="part 1: measured builds")
    sizes.add_argument("--warmup", type=int, help="part 1: warm-up builds")
    sizes.add_argument("--log-lines", type=int, help="part 2: lines the build prints")
    sizes.add_argument("--log-runs", type=int, help="part 2: builds per size (median)")
    sizes.add_argument("--followers", help="part 3: follower counts, comma-separated")
    sizes.add_argument("--tail-seconds", type=float, help="part 3: printing time per build")
    sizes.add_argument("--tail-rate", type=float, help="part 3: lines per second")
    sizes.add_argument("--sched-builds", type=int, help="part 4: queued builds")
    sizes.add_argument("--sched-accounts", type=int, help="part 4: accounts")
    sizes.add_argument("--burst", type=int, help="part 5: pushes at once")
    sizes.add_argument("--scale-builds", type=int, help="part 6: active builds")
    sizes.add_argument("--scale-runners", type=int, help="part 6: runner clients")
    sizes.add_argument("--scale-window", type=float, help="part 6: idle window (s)")
    sizes.add_argument("--cache-rounds", type=int, help="part 8: cold/warm build pairs")
    sizes.add_argument("--web-log-lines", type=int, help="part 9: lines of the large build page")
    sizes.add_argument("--web-page-runs", type=int, help="part 9: loads of the large build page")
    sizes.add_argument("--web-live-lines", type=int, help="part 9: lines followed in the browser")
    sizes.add_argument("--sse-followers", type=int, help="part 9: SSE (and gRPC) followers")
    sizes.add_argument("--sse-seconds", type=float, help="part 9: printing time per SSE build")
    return p


def _sizes(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name) if getattr(args, name) is not None else pair[args.quick]
        for name, pair in SIZES.items()
    }


def _runners(s: dict[str, Any]) -> dict[str, Callable[[Context], Awaitable[PartResult]]]:
    followers = tuple(int(x) for x in str(s["followers"]).split(","))
    return {
        "push": lambda c: push_latency.run(c, builds=s["builds"], warmup=s["warmup"]),
        "logs": lambda c: log_ingest.run(c, lines=s["log_lines"], runs=s["log_runs"]),
        "tail": lambda c: live_tail.run(
            c, followers=followers, seconds=s["tail_seconds"], rate=s["tail_rate"]
        ),
        "scheduler": lambda c: scheduler.run(
            c, builds=s["sched_builds"], accounts=s["sched_accounts"]
        ),
        "burst": lambda c: burst.run(c, pushes=s["burst"]),
        "scale": lambda c: scale.run(
            c, builds=s["scale_builds"], runners=s["scale_runners"], window=s["scale_window"]
        ),
        "cache": lambda c: cache.run(c, rounds=s["cache_rounds"]),
        "dashboard": lambda c: dashboard.run(
            c,
            log_lines=s["web_log_lines"],
            page_runs=s["web_page_runs"],
            live_lines=s["web_live_lines"],
            rate=s["tail_rate"],
            sse_followers=s["sse_followers"],
            sse_seconds=s["sse_seconds"],
        ),
    }


async def _postgres_version(url: str) -> str:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SHOW server_version")
        row = await cur.fetchone()
    return str(row[0]) if row else "unknown"


async def main(args: argparse.Namespace) -> int:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; choose from {PARTS}", file=sys.stderr)
        return 2
    s = _sizes(args)
    command = _command()
    work = _work_dir()
    load_at_start = os.getloadavg()
    code = code_under_test(REPO)
    if args.commit:
        try:
            src, sha = exported(REPO, args.commit, work / "code")
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # Every Conveyor process the parts start imports the exported code.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p
        )
        code = f"{sha[:12]} (its src/ exported with git archive)"
    print(f"work directory: {work}; load average {load_at_start}", flush=True)
    postgres = Postgres(work / "postgres")
    results: list[PartResult] = []
    failures: list[str] = []
    began = time.monotonic()
    try:
        await postgres.start()
        pg_version = await _postgres_version(postgres.url)
        ctx = Context(work, postgres, args.profile.resolve() if args.profile else None)
        runners = _runners(s)
        for part in parts:
            print(f"== {_method(MODULES[part])[0]}", flush=True)
            t = time.monotonic()
            try:
                results.append(await runners[part](ctx))
            except (BenchError, TimeoutError, RuntimeError, OSError, psycopg.Error,
                    grpc.RpcError, aiohttp.ClientError) as exc:  # fmt: skip
                failures.append(f"{part}: {exc}")
                print(f"   FAILED: {exc}", flush=True)
                continue
            print(f"   done in {time.monotonic() - t:.0f} s", flush=True)
    finally:
        await postgres.stop()
    peer: dict[str, Any] = {}
    peer_note = "Buildbot was not run (`--peer` not given)."
    if args.peer:
        print("== Part 7: Buildbot 4.3 on this machine (../shared/peers/buildbot)", flush=True)
        try:
            peer = await buildbot_peer.run(
                work, args.peer_harness, latency_reps=s["builds"], burst=s["burst"]
            )
            peer_note = _peer_note(peer)
        except (BenchError, OSError, KeyError, ValueError) as exc:
            failures.append(f"buildbot: {exc}")
            peer_note = f"Buildbot did not run to the end: {exc}"
            print(f"   FAILED: {exc}", flush=True)
    figures = _with_peer([f for r in results for f in r.figures], peer)
    print()
    print(table(figures))
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"\n(all parts took {time.monotonic() - began:.0f} s)")
    doc = args.doc or (None if args.quick else REPO / "docs" / "benchmarks.md")
    if doc is not None and not args.no_doc:
        methods = [_method(MODULES[p]) for p in parts]
        if args.peer:
            methods.append(_method(buildbot_peer))
        text = markdown(
            figures,
            failures,
            command.strip(),
            machine(code, pg_version, load_at_start),
            methods,
            peer_note,
        )
        doc.write_text(text)
        print(f"wrote {doc}")
    if args.json is not None:
        raw = {
            "command": command,
            "sizes": s,
            "parts": {r.name: r.raw for r in results},
            "figures": [asdict(f) for f in figures],
            "peer": peer,
            "failures": failures,
        }
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if args.keep or failures:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def _command() -> str:
    """This run's command line, as it can be typed again from the repository."""
    exe = Path(sys.executable)
    shown = str(exe.relative_to(REPO)) if exe.is_relative_to(REPO) else "python"
    prefix = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    return f"{prefix}{shown} -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _work_dir() -> Path:
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    work.chmod(0o755)  # the build user must reach the repositories below
    return work


def _with_peer(figures: list[Figure], peer: dict[str, Any]) -> list[Figure]:
    if not peer:
        return figures
    values = buildbot_peer.peer_figures(peer)
    return [replace(f, peer=values[f.peer_key]) if f.peer_key in values else f for f in figures]


def _peer_note(peer: dict[str, Any]) -> str:
    versions = peer.get("versions", {})
    version = versions.get("master:Buildbot") or versions.get("master:buildbot") or "4.3"
    n_lines = peer.get("log", {}).get("n_lines", "?")
    return (
        f"Buildbot {version} ran right after Conveyor on this machine with the harness in"
        f" ../shared/peers/buildbot (one worker, max_builds=6). Its push → started is the first"
        f" REST poll (every 10 ms) that shows the build; its log figure is for `seq 1"
        f" {n_lines}` from build start to the log complete and its last line served; its burst"
        f" spreads 50 pushes over 10 builders. Raw results: {peer.get('results_file', '?')}."
    )


def _method(module: ModuleType) -> tuple[str, str]:
    doc = (module.__doc__ or "").strip()
    title, _, body = doc.partition("\n")
    return title.rstrip("."), body


if __name__ == "__main__":
    sys.exit(asyncio.run(main(_parser().parse_args())))
