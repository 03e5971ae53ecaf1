"""Part 10: what requests nobody signed cost the control plane's memory.

`conveyor control serve` against its own database, attacked the way the
security review of issue 15 did: ``requests`` large requests, ``concurrency``
of them at once, carrying no credential the server accepts, on each door:

* a ConfigService RPC with no token (a 15 MiB ``SetEnvVar``);
* the runner's log RPC (``AppendLogs``) with a made-up build token;
* the dashboard's sign-in form (``POST /login``);
* a GitHub webhook of a real project with a wrong signature.

The reading is the control-plane process's resident memory, sampled every
10 ms: its peak during each attack minus its value when that attack began,
and, once all four are over, its growth over the baseline before the first.
Every request must be refused; the target (≤ 50 MB) is the issue's.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import psutil
from grpc import aio

from bench.context import Context
from bench.figures import Figure, PartResult, at_most
from bench.processes import BenchError, ControlServe
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc
from conveyor.v1 import runner_service_pb2 as rs

PART = "10 hostile"
MiB = 1024 * 1024
TARGET_MB = 50.0
SAMPLE_EVERY = 0.01
_SEND_LIMIT = 32 * MiB  # the attacker's channel sends whatever it likes


class PeakMeter:
    """Samples one process's RSS until stopped; ``peak_mb`` is the highest."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.rss())
            await asyncio.sleep(SAMPLE_EVERY)

    def __enter__(self) -> PeakMeter:
        self.peak = self.rss()
        self._task = asyncio.create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.peak = max(self.peak, self.rss())


async def _flood(
    requests: int, concurrency: int, one: Callable[[], Awaitable[str]]
) -> dict[str, int]:
    """Run ``one`` ``requests`` times, ``concurrency`` at once; count the
    outcomes it names."""
    gate = asyncio.Semaphore(concurrency)
    outcomes: dict[str, int] = {}

    async def guarded() -> None:
        async with gate:
            outcome = await one()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    await asyncio.gather(*(guarded() for _ in range(requests)))
    return outcomes


async def _grpc_refusal(address: str, path: str, body: bytes, token: str) -> str:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    # A channel per request, as separate attackers would have.
    async with aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", _SEND_LIMIT)]
    ) as channel:
        try:
            # Bytes in, bytes out: the attacker needs no stubs.
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            await call(body, metadata=metadata, timeout=60)
        except aio.AioRpcError as exc:
            return exc.code().name
    return "OK"


async def _http_refusal(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> str:
    try:
        # A file-like body: aiohttp streams it instead of one blocking write.
        async with session.post(url, data=io.BytesIO(body), headers=headers) as response:
            await response.read()
            return str(response.status)
    except aiohttp.ClientError:
        # The server may close the connection on an oversized body before
        # the client has sent it all: that is a refusal too.
        return "disconnected"


async def run(
    ctx: Context, requests: int = 80, concurrency: int = 40, size_mib: float = 15.0
) -> PartResult:
    """Raises ``BenchError`` when a request is not refused."""
    work = ctx.part_dir("hostile")
    database_url = await ctx.postgres.new_database("hostile")
    size = int(size_mib * MiB)
    big = os.urandom(size)
    async with ControlServe(work, database_url) as control:
        await control.start()
        admin = (("authorization", f"Bearer {control.admin_token}"),)
        async with aio.insecure_channel(control.grpc_address) as channel:
            project = await config_service_pb2_grpc.ConfigServiceStub(channel).CreateProject(
                cs.CreateProjectRequest(
                    name="target", repo_url="https://example.com/t.git", build_command="true"
                ),
                metadata=admin,
            )
        # A fresh process settles (imports, pool, first requests) before the baseline.
        await asyncio.sleep(2)
        meter = PeakMeter(control.pid)
        baseline = meter.rss()
        env_var = cs.SetEnvVarRequest(project="target", name="X", value="x" * size)
        logs = rs.AppendLogsRequest(build_id=str(uuid.uuid4()), seq=1, packed=big)
        attacks: list[tuple[str, Callable[[], Awaitable[str]], set[str]]] = [
            (
                "gRPC SetEnvVar, no token",
                lambda: _grpc_refusal(
                    control.grpc_address,
                    "/conveyor.v1.ConfigService/SetEnvVar",
                    env_var.SerializeToString(),
                    "",
                ),
                {"UNAUTHENTICATED"},
            ),
            (
                "gRPC AppendLogs, made-up build token",
                lambda: _grpc_refusal(
                    control.grpc_address,
                    "/conveyor.v1.RunnerService/AppendLogs",
                    logs.SerializeToString(),
                    "cvb_made-up",
                ),
                {"UNAUTHENTICATED", "PERMISSION_DENIED"},
            ),
        ]
        raw: dict[str, Any] = {"baseline_mb": baseline / MiB, "size_mib": size_mib}
        figures: list[Figure] = []
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            signed = {
                "Content-Type": "application/json",
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": "sha256=" + "0" * 64,
            }
            attacks += [
                (
                    "POST /login",
                    lambda: _http_refusal(
                        session, f"{control.http_url}/login", b"token=" + b"x" * size, form
                    ),
                    {"403", "413", "disconnected"},
                ),
                (
                    "GitHub webhook, wrong signature",
                    lambda: _http_refusal(
                        session,
                        f"{control.http_url}/webhooks/github/{project.project.id}",
                        b'{"x":"' + b"x" * size + b'"}',
                        signed,
                    ),
                    {"401", "413", "disconnected"},
                ),
            ]
            for name, one, refusals in attacks:
                # One request first: what the server allocates once for a
                # kind of call (its first large read, thread and arena
                # set-up) is not what each further request costs, and made
                # the first attack's reading swing by 30 MB from run to run.
                # The growth over the baseline below still counts it.
                await one()
                began = time.monotonic()
                before = meter.rss()
                with meter:
                    outcomes = await _flood(requests, concurrency, one)
                took = time.monotonic() - began
                raw[name] = {"outcomes": outcomes, "peak_mb": meter.peak / MiB, "seconds": took}
                if not set(outcomes) <= refusals:
                    raise BenchError(f"{name}: expected only {sorted(refusals)}, got {outcomes}")
                figures.append(
                    Figure(
                        PART,
                        f"{name}: peak RSS growth",
                        round((meter.peak - before) / MiB, 1),
                        "MB",
                        at_most(TARGET_MB),
                        note=f"{requests} x {size_mib:g} MiB, {concurrency} at once; {took:.1f} s",
                    )
                )
        after = meter.rss()
        raw["after_mb"] = after / MiB
        figures.append(
            Figure(
                PART,
                "all four attacks: RSS growth, after",
                round((after - baseline) / MiB, 1),
                "MB",
                note="includes freed memory the allocator keeps for reuse",
            )
        )
    return PartResult(PART, figures, raw)


def _main() -> None:
    """``python -m bench.hostile``: this part alone, against a throwaway
    embedded PostgreSQL, printing its table (the work directory, with the
    control plane's log, is kept when the part fails)."""
    import shutil
    import tempfile
    from pathlib import Path

    from bench.processes import Postgres
    from bench.report import table

    work = Path(tempfile.mkdtemp(prefix="conveyor-hostile-"))
    work.chmod(0o755)

    async def go() -> PartResult:
        postgres = Postgres(work / "postgres")
        await postgres.start()
        try:
            return await run(Context(work, postgres))
        finally:
            await postgres.stop()

    result = asyncio.run(go())
    print(table(result.figures))
    print(result.raw)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    _main()
