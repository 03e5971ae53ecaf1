"""How the benchmark talks to Conveyor: the gRPC API as a user, signed GitHub
push webhooks as a forge, and a LISTEN connection that tells it the moment a
build changes state or a log batch is stored.

The LISTEN side only watches: it reads the NOTIFY that Conveyor sends anyway
(``conveyor_build`` after each transition, ``conveyor_logs`` after each
stored batch), so it adds no load to the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import psycopg
from grpc import aio

from control.webhooks.github import signature
from conveyor.v1 import build_manager_pb2 as bm
from conveyor.v1 import build_manager_pb2_grpc as bm_grpc
from conveyor.v1 import config_service_pb2 as cs
from conveyor.v1 import config_service_pb2_grpc as cs_grpc
from conveyor.v1 import types_pb2 as pb

FINAL = frozenset({"succeeded", "failed", "canceled", "timed_out", "errored", "superseded"})
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class Api:
    """The user-facing gRPC services with an account token."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.config = cs_grpc.ConfigServiceStub(self.channel)
        self.builds = bm_grpc.BuildManagerStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    async def create_project(self, name: str, repo: str, build_command: str) -> pb.Project:
        """A project whose production branch is main, building every branch,
        with ``build_command`` and no deploy step."""
        reply = await self.config.CreateProject(
            cs.CreateProjectRequest(
                name=name,
                repo_url=repo,
                production_branch="main",
                build_command=build_command,
                build_other_branches=True,
            ),
            metadata=self.metadata,
            timeout=30,
        )
        return reply.project

    async def get(self, build_id: str) -> pb.Build:
        reply = await self.config.GetBuild(
            cs.GetBuildRequest(build_id=build_id), metadata=self.metadata, timeout=30
        )
        return reply.build

    async def read_log(self, build_id: str) -> int:
        """Read the whole stored log (no follow); return the line count."""
        count = 0
        async for message in self.builds.StreamLogs(
            bm.StreamLogsRequest(build_id=build_id), metadata=self.metadata, timeout=300
        ):
            count += len(message.lines)
        return count


async def scrape(http_url: str) -> dict[str, float]:
    """The control plane's /metrics as {"name{labels}": value}."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{http_url}/metrics", timeout=aiohttp.ClientTimeout(total=30)) as response,
    ):
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                values[key] = float(value)
            except ValueError:
                continue
    return values


def push_body(branch: str, sha: str, before: str = "0" * 40) -> bytes:
    """A GitHub push payload of the documented shape."""
    return json.dumps(
        {
            "ref": f"refs/heads/{branch}",
            "before": before,
            "after": sha,
            "deleted": False,
            "head_commit": {"id": sha, "message": "bench"},
            "repository": {"full_name": "bench/repo"},
        }
    ).encode()


class Forge:
    """Sends signed GitHub push webhooks to one project."""

    def __init__(self, http_url: str, project: pb.Project) -> None:
        self.url = f"{http_url}/webhooks/github/{project.id}"
        self.secret = project.webhook_secret
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200), timeout=aiohttp.ClientTimeout(total=60)
        )

    async def close(self) -> None:
        await self.session.close()

    def signed(self, branch: str, sha: str) -> tuple[bytes, dict[str, str]]:
        body = push_body(branch, sha)
        headers = {
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": secrets.token_hex(16),
            "X-Hub-Signature-256": signature(self.secret, body),
            "Content-Type": "application/json",
        }
        return body, headers

    async def post(self, body: bytes, headers: dict[str, str]) -> str:
        """POST one delivery; return the queued build id. Raises
        ``RuntimeError`` unless Conveyor answered 202 queued."""
        async with self.session.post(self.url, data=body, headers=headers) as response:
            text = await response.text()
        try:
            reply: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError:
            reply = {}
        if response.status != 202 or reply.get("result") != "queued":
            raise RuntimeError(f"webhook answered {response.status}: {text[:300]}")
        return str(reply["build_id"])

    async def push(self, branch: str, sha: str) -> tuple[float, str]:
        """Sign, then take t0 (wall clock, s) right before the POST; return
        (t0, build id)."""
        body, headers = self.signed(branch, sha)
        t0 = time.time()
        return t0, await self.post(body, headers)


@dataclass(frozen=True)
class BuildTimes:
    """A build's row: server timestamps as unix seconds (None when unset)."""

    id: str
    status: str
    commit_sha: str
    branch: str
    created: float
    received: float | None
    assigned: float | None
    started: float | None
    running: float | None
    finished: float | None
    log_lines: int
    reason: str

    def at(self, name: str) -> float:
        """The timestamp ``name``; raises ``RuntimeError`` when it is unset."""
        value: float | None = getattr(self, name)
        if value is None:
            raise RuntimeError(f"build {self.id} ({self.status}) has no {name} time")
        return value


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


async def build_times(conn: psycopg.AsyncConnection[Any], build_ids: list[str]) -> list[BuildTimes]:
    cur = await conn.execute(
        "SELECT id::text, status, commit_sha, branch, created_at, received_at, assigned_at,"
        " started_at, running_at, finished_at, log_lines, status_reason FROM builds"
        " WHERE id = ANY(%s::uuid[])",
        (build_ids,),
    )
    by_id: dict[str, BuildTimes] = {}
    for row in await cur.fetchall():
        by_id[row[0]] = BuildTimes(
            row[0], row[1], row[2], row[3], row[4].timestamp(), _ts(row[5]), _ts(row[6]),
            _ts(row[7]), _ts(row[8]), _ts(row[9]), int(row[10]), row[11],
        )  # fmt: skip
    return [by_id[b] for b in build_ids if b in by_id]


class Watcher:
    """LISTENs on Conveyor's database for build transitions and stored log
    batches, and records when each notification arrived (wall clock)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.final_at: dict[str, float] = {}
        self.final_status: dict[str, str] = {}
        self.log_batches: dict[str, list[float]] = defaultdict(list)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def start(self) -> Watcher:
        self.conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        self._task = asyncio.create_task(self._listen(), name="bench-watcher")
        await asyncio.wait_for(self._ready.wait(), 30)
        return self

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True
        ) as conn:
            await conn.execute("LISTEN conveyor_build")
            await conn.execute("LISTEN conveyor_logs")
            self._ready.set()
            async for note in conn.notifies():
                now = time.time()
                if note.channel == "conveyor_logs":
                    self.log_batches[note.payload].append(now)
                    continue
                build_id, _, status = note.payload.partition(":")
                if status in FINAL and build_id not in self.final_at:
                    self.final_at[build_id] = now
                    self.final_status[build_id] = status
                    self._changed.set()

    async def wait_final(self, build_ids: list[str], within: float) -> None:
        """Wait until every build is final. Raises ``TimeoutError`` naming
        how many are not, after ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            missing = [b for b in build_ids if b not in self.final_at]
            if not missing:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(missing)} of {len(build_ids)} builds not final")
            self._changed.clear()
            # A bounded wait: the status is re-checked in the database too,
            # in case a notification was missed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 2.0))
            if self._changed.is_set():
                continue
            for row in await build_times(self.db(), missing):
                if row.status in FINAL and row.id not in self.final_at:
                    self.final_at[row.id] = time.time()
                    self.final_status[row.id] = row.status

    def db(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None:
            raise RuntimeError("the watcher is not started")
        return self.conn

    async def times(self, build_ids: list[str]) -> list[BuildTimes]:
        return await build_times(self.db(), build_ids)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.conn is not None:
            await self.conn.close()


async def db_commits(conn: psycopg.AsyncConnection[Any]) -> int:
    """Transactions committed in this database so far (the statistics are
    flushed by each backend at most once a second or so)."""
    cur = await conn.execute(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0
