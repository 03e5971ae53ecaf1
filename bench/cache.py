"""Part 8: the build cache: the time it saves a real dependency install.

`conveyor up` with its runner's default build cache (a directory on the
build host) and the local bubblewrap launcher, network on. The project's
repository holds a requirements.txt of real packages from PyPI; its build
step makes a virtualenv and pip-installs them, as a Python service's build
does. The project keeps the default cache settings (requirements*.txt keys
it; .venv and ~/.cache/pip are among the default paths).

Each round: purge the cache (`PurgeCache`), build (cold: downloads and
installs, then saves), build again on the same lock file (warm: restores,
pip finds every requirement satisfied). After the rounds, one build with a
package added to the lock file (falls back to production's newest cache
and installs only the new package). The figures are the median build-step
times (the step's own start and end, as the runner reported them) and the
restore/save times from the runner's log lines. Needs PyPI: the part fails
with a clear message when the build host cannot reach it.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time

from bench.client import Api
from bench.context import Context
from bench.figures import Figure, PartResult
from bench.gitrepo import Repo
from bench.processes import BenchError, ConveyorUp
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import types_pb2 as pb

PART = "8 build cache"
REQUIREMENTS = (
    "requests==2.32.3\nrich==13.9.4\npydantic==2.10.3\nclick==8.1.7\njinja2==3.1.4\n"
    "pyyaml==6.0.2\nhttpx==0.28.1\nattrs==24.2.0\n"
)
ADDED = "python-dateutil==2.9.0.post0\n"
INSTALL = (
    "python3 -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check"
    " -r requirements.txt && .venv/bin/python -c 'import requests, rich, pydantic, yaml, httpx'"
)
_TIMED = re.compile(r"^cache (restored|saved): .* in ([0-9.]+) s(?:;|$)")


async def run(ctx: Context, rounds: int = 3) -> PartResult:
    work = ctx.part_dir("cache")
    database_url = await ctx.postgres.new_database("cache")
    repo = Repo(work / "repo")
    repo.write("requirements.txt", REQUIREMENTS, "requirements")
    async with ConveyorUp(work, database_url, capacity=2, profile=ctx.profile("cache")) as up:
        await up.start()
        api = Api(up.grpc_address, up.token)
        try:
            await api.create_project("cached", str(repo.path), INSTALL)
            cold: list[float] = []
            warm: list[float] = []
            cold_whole: list[float] = []
            warm_whole: list[float] = []
            restores: list[float] = []
            saves: list[float] = []
            for _ in range(rounds):
                await api.config.PurgeCache(
                    cs.PurgeCacheRequest(project="cached"), metadata=api.metadata, timeout=30
                )
                step, whole, timed = await _build(api)
                cold.append(step)
                cold_whole.append(whole)
                saves += timed.get("saved", [])
                step, whole, timed = await _build(api)
                warm.append(step)
                warm_whole.append(whole)
                restores += timed.get("restored", [])
            repo.write("requirements.txt", REQUIREMENTS + ADDED, "one more package")
            changed, _whole, timed = await _build(api)
            fallback_restores = timed.get("restored", [])
        finally:
            await api.close()
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    saved_s = statistics.median(cold_whole) - statistics.median(warm_whole)
    raw = {
        "rounds": rounds,
        "cold_build_s": cold_whole,
        "warm_build_s": warm_whole,
        "cold_build_step_s": cold,
        "warm_build_step_s": warm,
        "restore_s": restores,
        "save_s": saves,
        "changed_lock_build_step_s": changed,
        "fallback_restore_s": fallback_restores,
    }
    restore_note = f"restore {statistics.median(restores):.2f} s" if restores else "no restore"
    save_note = f"save {statistics.median(saves):.2f} s" if saves else "no save"
    figures = [
        Figure(PART, "build step, cold cache (pip from PyPI)", cold_s, "s",
               note=f"median of {rounds}; {save_note} after it"),
        Figure(PART, "build step, same lock file (cache restored)", warm_s, "s",
               note=f"median of {rounds}; {restore_note} before it"),
        Figure(PART, "time the cache saves a whole build", saved_s, "s",
               note=f"running → finished, median {statistics.median(cold_whole):.2f} s cold"
               f" vs {statistics.median(warm_whole):.2f} s warm, restore and save included"),
        Figure(PART, "build step, one package added (production fallback)", changed, "s",
               note="restored the newest production cache"
               + (f" in {fallback_restores[0]:.2f} s" if fallback_restores else " (NOT restored)")
               + ", installed one package"),
        Figure(PART, "speed-up of the build step", cold_s / warm_s if warm_s else None, "x",
               lower_is_better=False),
    ]  # fmt: skip
    return PartResult("cache", figures, raw)


async def _build(api: Api) -> tuple[float, float, dict[str, list[float]]]:
    """Trigger a build of main; return its build step's time, its time
    from running to finished, and the cache's own timings from the log."""
    reply = await api.config.TriggerBuild(
        cs.TriggerBuildRequest(project="cached"), metadata=api.metadata, timeout=30
    )
    build_id = reply.build.id
    deadline = time.monotonic() + 900
    while True:
        build = await api.get(build_id)
        if build.status not in (
            pb.BUILD_STATUS_QUEUED, pb.BUILD_STATUS_INITIALIZING, pb.BUILD_STATUS_RUNNING,
        ):  # fmt: skip
            break
        if time.monotonic() > deadline:
            raise BenchError(f"build {build_id} did not finish within 900 s")
        await asyncio.sleep(0.2)
    if build.status != pb.BUILD_STATUS_SUCCEEDED:
        raise BenchError(
            f"build {build_id} {pb.BuildStatus.Name(build.status)}: {build.status_reason}"
            " (does the build host reach PyPI?)"
        )
    [step] = [s for s in build.steps if s.name == "build"]
    took = step.finished_at.ToDatetime() - step.started_at.ToDatetime()
    whole = build.finished_at.ToDatetime() - build.running_at.ToDatetime()
    timed: dict[str, list[float]] = {}
    async for message in api.builds.StreamLogs(
        bm.StreamLogsRequest(build_id=build_id), metadata=api.metadata, timeout=60
    ):
        for line in message.lines:
            match = _TIMED.match(line.text) if line.stream == pb.LOG_STREAM_SYSTEM else None
            if match:
                timed.setdefault(match.group(1), []).append(float(match.group(2)))
    return took.total_seconds(), whole.total_seconds(), timed
