"""A double of Nomad's HTTP API that really runs each task as a local process.

It follows these pages of https://developer.hashicorp.com/nomad/api-docs:

- ``jobs``: register (PUT/POST /v1/jobs, answering EvalID, JobModifyIndex...),
  read (GET /v1/job/:id), list allocations (GET /v1/job/:id/allocations) and
  deregister (DELETE /v1/job/:id, ``purge``);
- ``allocations``: read (GET /v1/allocation/:id) with ``TaskStates`` and their
  ``Events`` (the last 10 only, as Nomad keeps them); ``client``'s signal
  (POST /v1/client/allocation/:id/signal), which adds a ``Signaling`` event;
- ``evaluations``: read (GET /v1/evaluation/:id), with ``FailedTGAllocs`` (an
  AllocMetric per group) and a ``BlockedEval`` when no node fits;
- ``variables``: create, read, delete (PUT/GET/DELETE /v1/var/:path);
- ``client``'s list files (GET /v1/client/fs/ls/:alloc_id, ``path``);
- ``client``'s stream logs (GET /v1/client/fs/logs/:alloc_id): JSON frames
  ``{"Offset", "Data", "File", "FileEvent"}`` (empty fields left out, Data in
  base64) and ``{}`` heartbeats, back to back with nothing between them, made
  the way client/fs_endpoint.go and client/lib/streamframer/framer.go make
  them: reads of ``read_bytes`` merge into frames of up to ``frame_bytes``
  sent every ``batch_seconds``, and a frame's Offset is its first read's end
  (plus the frame size per split), not the end of its Data; ``follow``,
  ``offset``, ``origin`` and ``plain`` as documented, offsets counted across
  rotated files from the first one the way Nomad's ``findClosest`` does, and
  a ``file deleted`` event when the file being read disappears;
- the index page's blocking queries: ``?index=N&wait=D`` and ``X-Nomad-Index``.

It is one client node, ``double-node`` in datacenter ``dc1``, with the node meta
and the CPU and memory given to the constructor; a constraint on a meta key it
lacks, a driver it does not offer or more CPU/memory than it has left (its
running allocations hold theirs) gives an evaluation with ``FailedTGAllocs``
and a blocked evaluation, and no allocation. Whenever an allocation ends, the
blocked evaluations that now fit are placed, as Nomad's blocked-evals tracker
does when capacity frees up.

Each task group must hold exactly one task. Tasks run like Nomad's ``raw_exec``
driver whatever the driver: ``Config.command`` with ``Config.args`` in the task
directory, in a new session, with the task's env (the host's env minus Nomad's
default denylist for raw_exec, only a PATH
for exec and docker; then NOMAD_* variables, the ``Env`` block and env
templates) and the rendered templates. The docker driver's ``image`` is
ignored and NOMAD_TASK_DIR is the host path, not ``/local``. A log collector
copies stdout/stderr into ``alloc/logs/<task>.<stdout|stderr>.<n>`` with
rotation (``log_rotate_bytes`` overrides LogConfig's size). Deregistering
sends ``KillSignal`` to the task's process and, after ``KillTimeout``, SIGKILL
to its process group.

Templates: only what Conveyor emits, which is literal text (any delimiters) and
``{{ with nomadVar "<path>" }}{{ range .Tuples }}{{ .K }}={{ .V | toJSON }}
{{ end }}{{ end }}`` (or ``toUnescapedJSON``), encoded like Go's encoding/json;
env templates are parsed like Nomad's parser (hashicorp/go-envparse). A
missing Variable fails the template (real Nomad would wait for it).

Request bodies: every key of a job, a Variable or a signal request must be a
field of Nomad's api struct for it (``_API_STRUCTS``, ``check_fields``), or
the double answers 400 where Nomad would silently drop the key. A driver
``Config`` key the driver does not know (``_DRIVER_CONFIG``) fails the task
with a Driver Failure event, as Nomad's driver does when it decodes it.

Switches for tests: ``node_meta``, ``drivers``, ``log_rotate_bytes``,
``frame_bytes`` and ``read_bytes`` (Nomad's 64 KiB by default),
``batch_seconds`` (Nomad's 200 ms) and
``cut_log_streams_after`` (every log stream connection is cut in the middle of
a frame once it has sent that many bytes of log data; ``log_stream_cuts``
counts the cuts). ``requests`` records every request (method, path and query,
body).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import fnmatch
import json
import os
import re
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiohttp import web

NODE_ID = "2b9c1f7e-6a53-4e0f-9d7c-0c0ffee00001"
NODE_NAME = "double-node"
DATACENTER = "dc1"
REGION = "global"
NODE_CPU_MHZ = 20_000
NODE_MEMORY_MB = 32_768
_ZERO_TIME = "0001-01-01T00:00:00Z"
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Nomad's default client `env.denylist`, kept from raw_exec tasks.
_ENV_DENYLIST = frozenset(
    {
        "CONSUL_TOKEN",
        "CONSUL_HTTP_TOKEN",
        "CONSUL_HTTP_TOKEN_FILE",
        "CONSUL_LICENSE",
        "VAULT_TOKEN",
        "VAULT_LICENSE",
        "NOMAD_LICENSE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "GOOGLE_APPLICATION_CREDENTIALS",
    }
)
_VAR_PATH = re.compile(r"^[a-zA-Z0-9\-_~/]{1,128}$")
_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")
_FRAME_BYTES = 64 * 1024
_MAX_EVENTS = 10

# The top-level keys of each driver's task config spec (taskConfigSpec in
# hashicorp/nomad drivers/docker/config.go, drivers/exec/driver.go and
# drivers/rawexec/driver.go), those v1.6.0 and v1.9.7 both have. Nomad decodes
# Config on the client when the task starts; an unknown key fails the task
# with a Driver Failure, and the double does the same.
_DRIVER_CONFIG: dict[str, frozenset[str]] = {
    "docker": frozenset(
        [
            "advertise_ipv6_address",
            "args",
            "auth",
            "auth_soft_fail",
            "cap_add",
            "cap_drop",
            "command",
            "cpu_cfs_period",
            "cpu_hard_limit",
            "cpuset_cpus",
            "devices",
            "dns_options",
            "dns_search_domains",
            "dns_servers",
            "entrypoint",
            "extra_hosts",
            "force_pull",
            "group_add",
            "healthchecks",
            "hostname",
            "image",
            "image_pull_timeout",
            "init",
            "interactive",
            "ipc_mode",
            "ipv4_address",
            "ipv6_address",
            "isolation",
            "labels",
            "load",
            "logging",
            "mac_address",
            "memory_hard_limit",
            "mount",
            "mounts",
            "network_aliases",
            "network_mode",
            "pid_mode",
            "pids_limit",
            "port_map",
            "ports",
            "privileged",
            "readonly_rootfs",
            "runtime",
            "security_opt",
            "shm_size",
            "storage_opt",
            "sysctl",
            "tty",
            "ulimit",
            "userns_mode",
            "uts_mode",
            "volume_driver",
            "volumes",
            "work_dir",
        ]
    ),
    "exec": frozenset({"args", "cap_add", "cap_drop", "command", "ipc_mode", "pid_mode"}),
    "raw_exec": frozenset({"args", "command"}),
}

# The JSON field names (and value kinds) of the api structs the launcher sends,
# taken from hashicorp/nomad at v1.6.0 and v1.9.7: api/jobs.go (JobRegisterRequest,
# WriteRequest, Job), api/tasks.go (TaskGroup, Task, Template, RestartPolicy,
# ReschedulePolicy, EphemeralDisk, LogConfig), api/resources.go (Resources),
# api/constraint.go (Constraint), api/variables.go (Variable) and
# api/allocations.go (AllocSignalRequest). Only fields both versions have are
# listed: Nomad's HTTP server decodes bodies with encoding/json and no
# DisallowUnknownFields, so any other key is dropped without an error; the
# double refuses it instead (exact spelling, though Go would also match a
# key case-insensitively) so that a misspelled key fails a test.
# Kinds: str, int, bool, dur (time.Duration: integer nanoseconds), strs (list
# of str), strmap (str to str), any (not checked: driver config, structs the
# launcher never sends), a struct name, or a struct name in brackets (a list).
_API_STRUCTS: dict[str, dict[str, str]] = {
    "JobRegisterRequest": {
        "Submission": "any",
        "Job": "Job",
        "EnforceIndex": "bool",
        "JobModifyIndex": "int",
        "PolicyOverride": "bool",
        "PreserveCounts": "bool",
        "EvalPriority": "int",
        # The embedded WriteRequest.
        "Region": "str",
        "Namespace": "str",
        "SecretID": "str",
    },
    "Job": {
        "Region": "str",
        "Namespace": "str",
        "ID": "str",
        "Name": "str",
        "Type": "str",
        "Priority": "int",
        "AllAtOnce": "bool",
        "Datacenters": "strs",
        "NodePool": "str",
        "Constraints": "[Constraint]",
        "Affinities": "any",
        "TaskGroups": "[TaskGroup]",
        "Update": "any",
        "Multiregion": "any",
        "Spreads": "any",
        "Periodic": "any",
        "ParameterizedJob": "any",
        "Reschedule": "ReschedulePolicy",
        "Migrate": "any",
        "Meta": "strmap",
        "ConsulToken": "str",
        "VaultToken": "str",
        "Stop": "bool",
        "ParentID": "str",
        "Dispatched": "bool",
        "DispatchIdempotencyToken": "str",
        "Payload": "str",
        "ConsulNamespace": "str",
        "VaultNamespace": "str",
        "NomadTokenID": "str",
        "Status": "str",
        "StatusDescription": "str",
        "Stable": "bool",
        "Version": "int",
        "SubmitTime": "int",
        "CreateIndex": "int",
        "ModifyIndex": "int",
        "JobModifyIndex": "int",
    },
    "TaskGroup": {
        "Name": "str",
        "Count": "int",
        "Constraints": "[Constraint]",
        "Affinities": "any",
        "Tasks": "[Task]",
        "Spreads": "any",
        "Volumes": "any",
        "RestartPolicy": "RestartPolicy",
        "ReschedulePolicy": "ReschedulePolicy",
        "EphemeralDisk": "EphemeralDisk",
        "Update": "any",
        "Migrate": "any",
        "Networks": "any",
        "Meta": "strmap",
        "Services": "any",
        "ShutdownDelay": "dur",
        "StopAfterClientDisconnect": "dur",
        "MaxClientDisconnect": "dur",
        "Scaling": "any",
        "Consul": "any",
    },
    "Task": {
        "Name": "str",
        "Driver": "str",
        "User": "str",
        "Lifecycle": "any",
        "Config": "any",
        "Constraints": "[Constraint]",
        "Affinities": "any",
        "Env": "strmap",
        "Services": "any",
        "Resources": "Resources",
        "RestartPolicy": "RestartPolicy",
        "Meta": "strmap",
        "KillTimeout": "dur",
        "LogConfig": "LogConfig",
        "Artifacts": "any",
        "Vault": "any",
        "Templates": "[Template]",
        "DispatchPayload": "any",
        "VolumeMounts": "any",
        "CSIPluginConfig": "any",
        "Leader": "bool",
        "ShutdownDelay": "dur",
        "KillSignal": "str",
        "Kind": "str",
        "ScalingPolicies": "any",
        "Identity": "any",
    },
    "Template": {
        "SourcePath": "str",
        "DestPath": "str",
        "EmbeddedTmpl": "str",
        "ChangeMode": "str",
        "ChangeScript": "any",
        "ChangeSignal": "str",
        "Splay": "dur",
        "Perms": "str",
        "Uid": "int",
        "Gid": "int",
        "LeftDelim": "str",
        "RightDelim": "str",
        "Envvars": "bool",
        "VaultGrace": "dur",
        "Wait": "any",
        "ErrMissingKey": "bool",
    },
    "Resources": {
        "CPU": "int",
        "Cores": "int",
        "MemoryMB": "int",
        "MemoryMaxMB": "int",
        "DiskMB": "int",
        "Networks": "any",
        "Devices": "any",
        "IOPS": "int",
    },
    "RestartPolicy": {"Interval": "dur", "Attempts": "int", "Delay": "dur", "Mode": "str"},
    "ReschedulePolicy": {
        "Attempts": "int",
        "Interval": "dur",
        "Delay": "dur",
        "DelayFunction": "str",
        "MaxDelay": "dur",
        "Unlimited": "bool",
    },
    "EphemeralDisk": {"Sticky": "bool", "Migrate": "bool", "SizeMB": "int"},
    "LogConfig": {"MaxFiles": "int", "MaxFileSizeMB": "int", "Enabled": "bool", "Disabled": "bool"},
    "Constraint": {"LTarget": "str", "RTarget": "str", "Operand": "str"},
    "Variable": {
        "Namespace": "str",
        "Path": "str",
        "CreateIndex": "int",
        "ModifyIndex": "int",
        "CreateTime": "int",
        "ModifyTime": "int",
        "Items": "strmap",
    },
    "AllocSignalRequest": {"Task": "str", "Signal": "str"},
}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path_qs: str
    body: bytes


@dataclass
class _Task:
    name: str
    spec: dict[str, Any]
    state: str = "pending"
    failed: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None
    process: subprocess.Popen[bytes] | None = None
    exited: asyncio.Future[int] | None = None
    killing: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "State": self.state,
            "Failed": self.failed,
            "Restarts": 0,
            "StartedAt": self.started_at or _ZERO_TIME,
            "FinishedAt": self.finished_at or _ZERO_TIME,
            # Nomad keeps a task's last 10 events (taskrunner's defaultMaxEvents).
            "Events": copy.deepcopy(self.events[-_MAX_EVENTS:]),
        }


@dataclass
class _Alloc:
    id: str
    eval_id: str
    job: dict[str, Any]
    group: str
    task: _Task
    dir: Path
    create_index: int
    modify_index: int
    client_status: str = "pending"
    desired_status: str = "run"

    @property
    def job_id(self) -> str:
        return str(self.job["ID"])

    @property
    def namespace(self) -> str:
        return str(self.job.get("Namespace") or "default")

    @property
    def terminal(self) -> bool:
        return self.client_status in ("complete", "failed", "lost")

    def stub(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "EvalID": self.eval_id,
            "Name": f"{self.job_id}.{self.group}[0]",
            "Namespace": self.namespace,
            "NodeID": NODE_ID,
            "NodeName": NODE_NAME,
            "JobID": self.job_id,
            "JobVersion": self.job.get("Version", 0),
            "TaskGroup": self.group,
            "DesiredStatus": self.desired_status,
            "DesiredDescription": "",
            "ClientStatus": self.client_status,
            "ClientDescription": "",
            "TaskStates": {self.task.name: self.task.to_json()},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


class _TemplateError(Exception):
    pass


class NomadDouble:
    """Nomad's HTTP API on 127.0.0.1 on a free port, running tasks under
    ``root``. ``await start()`` before use, ``await aclose()`` after (or use
    ``async with``); aclose kills every task still running."""

    def __init__(
        self,
        root: Path,
        *,
        node_meta: Mapping[str, str] | None = None,
        drivers: tuple[str, ...] = ("raw_exec", "exec", "docker"),
        log_rotate_bytes: int | None = None,
        heartbeat_seconds: float = 0.5,
        batch_seconds: float = 0.2,
        node_cpu_mhz: int = NODE_CPU_MHZ,
        node_memory_mb: int = NODE_MEMORY_MB,
    ) -> None:
        self.root = root
        self.node_cpu_mhz = node_cpu_mhz
        self.node_memory_mb = node_memory_mb
        self.node_meta = dict(node_meta or {})
        self.drivers = drivers
        self.log_rotate_bytes = log_rotate_bytes
        self.heartbeat_seconds = heartbeat_seconds
        self.cut_log_streams_after: int | None = None
        self.requests: list[RecordedRequest] = []
        self.log_connections = 0
        self.log_stream_cuts = 0
        self.frame_bytes = _FRAME_BYTES
        self.read_bytes = _FRAME_BYTES
        self.batch_seconds = batch_seconds
        self._jobs: dict[str, dict[str, Any]] = {}
        self._evals: dict[str, dict[str, Any]] = {}
        self._allocs: dict[str, _Alloc] = {}
        self._vars: dict[tuple[str, str], dict[str, Any]] = {}
        self._index = 1
        self._alloc_table_index = 1
        self._changed = asyncio.Condition()
        self._background: set[asyncio.Task[Any]] = set()
        self._streams: set[asyncio.Task[Any]] = set()
        # Blocking waits and pipe reads; apart from the default executor so
        # that they never hold up the code under test.
        self._threads = ThreadPoolExecutor(max_workers=32, thread_name_prefix="nomad-double")
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> NomadDouble:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        route = app.router.add_route
        route("PUT", "/v1/jobs", self._register)
        route("POST", "/v1/jobs", self._register)
        route("GET", "/v1/job/{id}", self._read_job)
        route("DELETE", "/v1/job/{id}", self._deregister)
        route("GET", "/v1/job/{id}/allocations", self._job_allocations)
        route("GET", "/v1/allocation/{id}", self._read_allocation)
        route("GET", "/v1/evaluation/{id}", self._read_evaluation)
        route("*", "/v1/var/{path:.+}", self._variable)
        route("GET", "/v1/client/fs/logs/{id}", self._logs)
        route("GET", "/v1/client/fs/ls/{id}", self._list_files)
        route("POST", "/v1/client/allocation/{id}/signal", self._signal)
        route("PUT", "/v1/client/allocation/{id}/signal", self._signal)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def aclose(self) -> None:
        for alloc in self._allocs.values():
            process = alloc.task.process
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
        for task in self._streams:
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._threads.shutdown(wait=True, cancel_futures=True)

    # What tests look at.

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The stored job, as GET /v1/job/:id would return it."""
        job = self._jobs.get(job_id)
        return copy.deepcopy(job) if job is not None else None

    def variable(self, path: str, namespace: str = "default") -> dict[str, Any] | None:
        var = self._vars.get((namespace, path))
        return copy.deepcopy(var) if var is not None else None

    def allocations(self, job_id: str) -> list[dict[str, Any]]:
        return [a.stub() for a in self._allocs.values() if a.job_id == job_id]

    def running_processes(self) -> int:
        return sum(
            1
            for a in self._allocs.values()
            if a.task.process is not None and a.task.process.poll() is None
        )

    # Plumbing.

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(RecordedRequest(request.method, request.path_qs, body))
        response: web.StreamResponse = await handler(request)
        return response

    def _bump(self) -> int:
        self._index += 1
        self._spawn(self._notify())
        return self._index

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _block(self, request: web.Request, current: Callable[[], int]) -> None:
        """Hold a blocking query until ``current()`` passes ``?index`` or
        ``?wait`` (default 5m) ends."""
        index = int(request.query.get("index") or 0)
        if index <= 0:
            return
        deadline = time.monotonic() + _duration(request.query.get("wait") or "5m")
        async with self._changed:
            while current() <= index:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    def _json(self, body: Any, index: int | None = None) -> web.Response:
        response = web.json_response(body)
        response.headers["X-Nomad-Index"] = str(index if index is not None else self._index)
        return response

    # Jobs.

    async def _register(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            check_fields(body, "JobRegisterRequest", "")
            job = body["Job"]
            _validate_job(job)
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(status=400, text=f"invalid job: {exc}")
        job = copy.deepcopy(job)
        job.setdefault("Namespace", request.query.get("namespace") or "default")
        job.setdefault("Region", REGION)
        previous = self._jobs.get(job["ID"])
        index = self._bump()
        job.update(
            Status="pending",
            Stop=False,
            Version=(previous["Version"] + 1) if previous else 0,
            CreateIndex=previous["CreateIndex"] if previous else index,
            ModifyIndex=index,
            JobModifyIndex=index,
            SubmitTime=time.time_ns(),
        )
        self._jobs[job["ID"]] = job
        evaluation = self._new_eval(job, "job-register", "pending")
        self._spawn(self._schedule(evaluation["ID"], job))
        return self._json(
            {
                "EvalID": evaluation["ID"],
                "EvalCreateIndex": index,
                "JobModifyIndex": index,
                "Warnings": "",
                "Index": index,
                "LastContact": 0,
                "KnownLeader": True,
            },
            index,
        )

    async def _read_job(self, request: web.Request) -> web.Response:
        job = self._jobs.get(request.match_info["id"])
        if job is None:
            return web.Response(status=404, text="job not found")
        return self._json(job, job["ModifyIndex"])

    async def _deregister(self, request: web.Request) -> web.Response:
        job = self._jobs.get(request.match_info["id"])
        if job is None:
            return web.Response(status=404, text="job not found")
        index = self._bump()
        evaluation = self._new_eval(job, "job-deregister", "complete")
        for other in self._evals.values():
            if other["JobID"] == job["ID"] and other["Status"] == "blocked":
                other.update(Status="canceled", ModifyIndex=index)
        for alloc in self._allocs.values():
            if alloc.job_id == job["ID"] and not alloc.terminal:
                self._spawn(self._kill(alloc))
        if _go_bool(request.query.get("purge")):
            del self._jobs[job["ID"]]
        else:
            job.update(Stop=True, Status="dead", ModifyIndex=index)
        return self._json(
            {
                "EvalID": evaluation["ID"],
                "EvalCreateIndex": index,
                "JobModifyIndex": index,
                "Index": index,
                "LastContact": 0,
                "KnownLeader": True,
            },
            index,
        )

    async def _job_allocations(self, request: web.Request) -> web.Response:
        await self._block(request, lambda: self._alloc_table_index)
        job_id = request.match_info["id"]
        return self._json(self.allocations(job_id), self._alloc_table_index)

    async def _read_allocation(self, request: web.Request) -> web.Response:
        alloc = self._allocs.get(request.match_info["id"])
        if alloc is None:
            return web.Response(status=404, text="alloc not found")
        await self._block(request, lambda: alloc.modify_index)
        body = alloc.stub()
        body["Job"] = copy.deepcopy(alloc.job)
        return self._json(body, alloc.modify_index)

    async def _read_evaluation(self, request: web.Request) -> web.Response:
        evaluation = self._evals.get(request.match_info["id"])
        if evaluation is None:
            return web.Response(status=404, text="eval not found")
        return self._json(evaluation, evaluation["ModifyIndex"])

    # Scheduling.

    def _new_eval(self, job: Mapping[str, Any], trigger: str, status: str) -> dict[str, Any]:
        evaluation = {
            "ID": str(uuid.uuid4()),
            "Namespace": job.get("Namespace") or "default",
            "Priority": job.get("Priority", 50),
            "Type": job.get("Type", "batch"),
            "TriggeredBy": trigger,
            "JobID": job["ID"],
            "JobModifyIndex": job.get("JobModifyIndex", self._index),
            "Status": status,
            "StatusDescription": "",
            "FailedTGAllocs": None,
            "BlockedEval": "",
            "PreviousEval": "",
            "QueuedAllocations": None,
            "CreateIndex": self._index,
            "ModifyIndex": self._index,
            "CreateTime": time.time_ns(),
            "ModifyTime": time.time_ns(),
        }
        self._evals[evaluation["ID"]] = evaluation
        return evaluation

    async def _schedule(self, eval_id: str, job: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)  # the evaluation stays pending for a moment
        evaluation = self._evals[eval_id]
        if self._jobs.get(job["ID"]) is not job:
            evaluation.update(Status="complete", ModifyIndex=self._bump())
            return
        failed = {}
        for group in job["TaskGroups"]:
            metric = self._fit(job, group)
            if metric is not None:
                failed[group["Name"]] = metric
        if failed:
            blocked = self._new_eval(job, "queued-allocs", "blocked")
            blocked["PreviousEval"] = eval_id
            evaluation.update(
                Status="complete",
                FailedTGAllocs=failed,
                BlockedEval=blocked["ID"],
                QueuedAllocations=dict.fromkeys(failed, 1),
                ModifyIndex=self._bump(),
            )
            return
        for group in job["TaskGroups"]:
            self._place(job, group, eval_id)
        job["Status"] = "running"
        evaluation.update(
            Status="complete",
            QueuedAllocations={g["Name"]: 0 for g in job["TaskGroups"]},
            ModifyIndex=self._bump(),
        )

    def _fit(self, job: Mapping[str, Any], group: Mapping[str, Any]) -> dict[str, Any] | None:
        """None when the node can run ``group``, else the AllocMetric saying why not."""
        metric: dict[str, Any] = {
            "NodesEvaluated": 0,
            "NodesFiltered": 0,
            "NodesInPool": 1,
            "NodesAvailable": {DATACENTER: 1},
            "ClassFiltered": None,
            "ConstraintFiltered": None,
            "NodesExhausted": 0,
            "ClassExhausted": None,
            "DimensionExhausted": None,
            "QuotaExhausted": None,
            "CoalescedFailures": 0,
        }
        if not any(fnmatch.fnmatchcase(DATACENTER, dc) for dc in job.get("Datacenters") or []):
            metric["NodesAvailable"] = dict.fromkeys(job.get("Datacenters") or [], 0)
            return metric
        metric["NodesEvaluated"] = 1
        tasks = group.get("Tasks") or []
        constraints = [
            *(job.get("Constraints") or []),
            *(group.get("Constraints") or []),
            *(c for t in tasks for c in t.get("Constraints") or []),
        ]
        for constraint in constraints:
            if not self._satisfies(constraint):
                text = f"{constraint.get('LTarget', '')} {constraint.get('Operand', '=')} "
                text += str(constraint.get("RTarget", ""))
                metric.update(NodesFiltered=1, ConstraintFiltered={text.strip(): 1})
                return metric
        if any(t.get("Driver") not in self.drivers for t in tasks):
            metric.update(NodesFiltered=1, ConstraintFiltered={"missing drivers": 1})
            return metric
        cpu, memory = _demand(tasks)
        used_cpu, used_memory = 0, 0
        for alloc in self._allocs.values():
            if not alloc.terminal:
                alloc_cpu, alloc_memory = _demand([alloc.task.spec])
                used_cpu, used_memory = used_cpu + alloc_cpu, used_memory + alloc_memory
        exhausted = {}
        if cpu > self.node_cpu_mhz - used_cpu:
            exhausted["cpu"] = 1
        if memory > self.node_memory_mb - used_memory:
            exhausted["memory"] = 1
        if exhausted:
            metric.update(NodesExhausted=1, DimensionExhausted=exhausted)
            return metric
        return None

    async def _unblock(self) -> None:
        """The blocked-evals tracker: capacity changed, so retry every blocked
        evaluation; one that now fits places its allocations and completes
        (they carry its ID), one that does not stays blocked."""
        for evaluation in list(self._evals.values()):
            job = self._jobs.get(evaluation["JobID"])
            if evaluation["Status"] != "blocked" or job is None or job.get("Stop"):
                continue
            if any(self._fit(job, group) is not None for group in job["TaskGroups"]):
                continue
            for group in job["TaskGroups"]:
                self._place(job, group, evaluation["ID"])
            job["Status"] = "running"
            evaluation.update(Status="complete", ModifyIndex=self._bump())

    def _satisfies(self, constraint: Mapping[str, Any]) -> bool:
        left = self._resolve(str(constraint.get("LTarget") or ""))
        right = self._resolve(str(constraint.get("RTarget") or ""))
        operand = constraint.get("Operand") or "="
        if operand in ("=", "==", "is"):
            return left is not None and left == right
        if operand in ("!=", "not"):
            return left != right
        if operand == "regexp":
            return left is not None and re.search(right or "", left) is not None
        if operand == "is_set":
            return left is not None
        if operand == "is_not_set":
            return left is None
        return False

    def _resolve(self, target: str) -> str | None:
        match = re.fullmatch(r"\$\{(.+)\}", target)
        if match is None:
            return target
        key = match.group(1)
        if key.startswith("meta."):
            return self.node_meta.get(key.removeprefix("meta."))
        known = {
            "node.unique.id": NODE_ID,
            "node.unique.name": NODE_NAME,
            "node.datacenter": DATACENTER,
            "node.region": REGION,
            "node.class": "",
            "attr.kernel.name": "linux",
            "attr.os.name": "linux",
        }
        if key.startswith("attr.driver."):
            return "1" if key.removeprefix("attr.driver.") in self.drivers else None
        return known.get(key)

    def _place(self, job: dict[str, Any], group: Mapping[str, Any], eval_id: str) -> None:
        alloc_id = str(uuid.uuid4())
        spec = group["Tasks"][0]
        task = _Task(name=spec["Name"], spec=spec)
        index = self._bump()
        alloc = _Alloc(
            id=alloc_id,
            eval_id=eval_id,
            job=job,
            group=group["Name"],
            task=task,
            dir=self.root / alloc_id,
            create_index=index,
            modify_index=index,
        )
        self._allocs[alloc_id] = alloc
        self._event(alloc, "Received", "Task received by client")
        self._spawn(self._run_task(alloc))

    # The client: running a task.

    def _event(self, alloc: _Alloc, kind: str, message: str, **extra: Any) -> None:
        event: dict[str, Any] = {
            "Type": kind,
            "Time": time.time_ns(),
            "DisplayMessage": message,
            "Message": "",
            "FailsTask": False,
            "Details": {},
            "ExitCode": 0,
            "Signal": 0,
            "KillTimeout": 0,
            "DriverError": "",
            "SetupError": "",
        }
        event.update(extra)
        alloc.task.events.append(event)
        self._changed_alloc(alloc)

    def _changed_alloc(self, alloc: _Alloc) -> None:
        alloc.modify_index = self._bump()
        self._alloc_table_index = alloc.modify_index

    def _finish(self, alloc: _Alloc, *, failed: bool) -> None:
        task = alloc.task
        task.state = "dead"
        task.failed = failed
        task.finished_at = _now()
        alloc.client_status = "failed" if failed else "complete"
        job = self._jobs.get(alloc.job_id)
        if job is alloc.job:
            job["Status"] = "dead"
        self._changed_alloc(alloc)
        self._spawn(self._unblock())

    async def _run_task(self, alloc: _Alloc) -> None:
        task = alloc.task
        spec = task.spec
        await asyncio.sleep(0.01)
        self._event(alloc, "Task Setup", "Building Task Directory")
        task_dir = alloc.dir / task.name
        logs = alloc.dir / "alloc" / "logs"
        for path in (task_dir / "local", task_dir / "secrets", task_dir / "tmp", logs):
            path.mkdir(parents=True, exist_ok=True)
        (alloc.dir / "alloc" / "data").mkdir(exist_ok=True)
        env = self._task_env(alloc, task_dir)
        try:
            env.update(self._render_templates(alloc, task_dir, env))
        except _TemplateError as exc:
            self._event(alloc, "Killing", f"Template failed: {exc}", FailsTask=True)
            self._event(alloc, "Killed", "Task successfully killed")
            self._finish(alloc, failed=True)
            return
        if task.killing:
            self._event(alloc, "Killed", "Task successfully killed")
            self._finish(alloc, failed=False)
            return
        config = spec.get("Config") or {}
        try:
            check_driver_config(spec["Driver"], config)
        except ValueError as exc:
            self._event(alloc, "Driver Failure", str(exc), DriverError=str(exc), FailsTask=True)
            self._finish(alloc, failed=True)
            return
        command = _interpolate(str(config.get("command") or ""), env)
        args = [_interpolate(str(a), env) for a in config.get("args") or []]
        if spec["Driver"] == "docker":
            self._event(alloc, "Driver", "Downloading image", DriverMessage="Downloading image")
        for kind in ("stdout", "stderr"):
            (logs / f"{task.name}.{kind}.0").touch()
        try:
            # Popen, not asyncio's subprocess: its wait() also waits for the pipes,
            # which processes the task started may hold long after it exited.
            process = subprocess.Popen(  # noqa: ASYNC220 - fork and exec do not block for long
                [command, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=task_dir,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            error = f"failed to launch command with executor: {exc}"
            self._event(alloc, "Driver Failure", error, DriverError=error, FailsTask=True)
            self._finish(alloc, failed=True)
            return
        loop = asyncio.get_running_loop()
        task.process = process
        task.exited = loop.run_in_executor(self._threads, process.wait)
        log_config = spec.get("LogConfig") or {}
        rotate = self.log_rotate_bytes or int(log_config.get("MaxFileSizeMB") or 10) << 20
        max_files = int(log_config.get("MaxFiles") or 10)
        collectors = [
            loop.run_in_executor(
                self._threads, _collect, pipe, logs, task.name, kind, rotate, max_files
            )
            for pipe, kind in ((process.stdout, "stdout"), (process.stderr, "stderr"))
        ]
        task.state = "running"
        task.started_at = _now()
        alloc.client_status = "running"
        self._event(alloc, "Started", "Task started by client")
        if task.killing:
            self._spawn(self._terminate(alloc))
        try:
            code = await asyncio.shield(task.exited)
        finally:
            # Like Nomad's executor: nothing the task started outlives it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.gather(*collectors, return_exceptions=True)
        signal_number = -code if code < 0 else 0
        exit_code = 128 + signal_number if signal_number else code
        message = f"Exit Code: {exit_code}" + (
            f", Signal: {signal_number}" if signal_number else ""
        )
        details = {"exit_code": str(exit_code), "signal": str(signal_number), "oom_killed": "false"}
        self._event(
            alloc, "Terminated", message, ExitCode=exit_code, Signal=signal_number, Details=details
        )
        if task.killing:
            self._event(alloc, "Killed", "Task successfully killed")
        elif exit_code != 0:
            self._event(alloc, "Not Restarting", "Policy allows no restarts", FailsTask=True)
        self._finish(alloc, failed=exit_code != 0 and not task.killing)

    def _task_env(self, alloc: _Alloc, task_dir: Path) -> dict[str, str]:
        spec = alloc.task.spec
        if spec["Driver"] == "raw_exec":
            env = {k: v for k, v in os.environ.items() if k not in _ENV_DENYLIST}
        else:
            env = {"PATH": _DEFAULT_PATH}
        resources = spec.get("Resources") or {}
        env.update(
            NOMAD_ALLOC_DIR=str(alloc.dir / "alloc"),
            NOMAD_TASK_DIR=str(task_dir / "local"),
            NOMAD_SECRETS_DIR=str(task_dir / "secrets"),
            NOMAD_ALLOC_ID=alloc.id,
            NOMAD_ALLOC_NAME=f"{alloc.job_id}.{alloc.group}[0]",
            NOMAD_ALLOC_INDEX="0",
            NOMAD_TASK_NAME=alloc.task.name,
            NOMAD_GROUP_NAME=alloc.group,
            NOMAD_JOB_ID=alloc.job_id,
            NOMAD_JOB_NAME=str(alloc.job.get("Name") or alloc.job_id),
            NOMAD_NAMESPACE=alloc.namespace,
            NOMAD_REGION=REGION,
            NOMAD_DC=DATACENTER,
            NOMAD_CPU_LIMIT=str(resources.get("CPU") or 100),
            NOMAD_MEMORY_LIMIT=str(resources.get("MemoryMB") or 300),
        )
        for key, value in (spec.get("Env") or {}).items():
            env[key] = _interpolate(str(value), env)
        return env

    def _render_templates(
        self, alloc: _Alloc, task_dir: Path, env: dict[str, str]
    ) -> dict[str, str]:
        """Write every template; return the variables of the env ones."""
        template_env: dict[str, str] = {}
        for template in alloc.task.spec.get("Templates") or []:
            if template.get("SourcePath"):
                raise _TemplateError("the double renders only embedded templates")
            rendered = _render(
                str(template.get("EmbeddedTmpl") or ""),
                str(template.get("LeftDelim") or "{{"),
                str(template.get("RightDelim") or "}}"),
                lambda path: self._variable_items(alloc.namespace, path),
            )
            dest = (task_dir / _interpolate(str(template["DestPath"]), env)).resolve()
            if not dest.is_relative_to(task_dir.resolve()):
                raise _TemplateError(f"destination {template['DestPath']!r} escapes the task dir")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(rendered)
            dest.chmod(int(str(template.get("Perms") or "0644"), 8))
            if template.get("Envvars"):
                try:
                    template_env.update(_parse_env(rendered))
                except ValueError as exc:
                    raise _TemplateError(f"failed to read environment variables: {exc}") from exc
        return template_env

    def _variable_items(self, namespace: str, path: str) -> dict[str, str]:
        var = self._vars.get((namespace, path))
        if var is None:
            raise _TemplateError(f"Missing: nomad.var.block({path}@{namespace}.{REGION})")
        return dict(var["Items"])

    async def _kill(self, alloc: _Alloc) -> None:
        """Stop a task like a deregistration does: KillSignal, KillTimeout, SIGKILL."""
        task = alloc.task
        alloc.desired_status = "stop"
        self._changed_alloc(alloc)
        if task.killing or task.state == "dead":
            return
        task.killing = True
        if task.process is not None:
            await self._terminate(alloc)
        # Otherwise _run_task sees `killing` before or right after it starts the process.

    async def _terminate(self, alloc: _Alloc) -> None:
        spec = alloc.task.spec
        process, exited = alloc.task.process, alloc.task.exited
        assert process is not None
        assert exited is not None
        timeout_ns = int(spec.get("KillTimeout") or 5_000_000_000)
        default_signal = "SIGTERM" if spec["Driver"] == "docker" else "SIGINT"
        kill_signal = signal.Signals[spec.get("KillSignal") or default_signal]
        self._event(
            alloc,
            "Killing",
            f"Sent interrupt. Waiting {timeout_ns / 1e9:g}s before force killing",
            KillTimeout=timeout_ns,
        )
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(kill_signal)
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout_ns / 1e9)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    async def _signal(self, request: web.Request) -> web.Response:
        alloc = self._allocs.get(request.match_info["id"])
        if alloc is None:
            return web.Response(status=404, text="alloc not found")
        body = await request.json()
        try:
            check_fields(body, "AllocSignalRequest")
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        process = alloc.task.process
        if process is None or process.poll() is not None:
            return web.Response(status=400, text="Task not running")
        try:
            number = signal.Signals[str(body.get("Signal") or "")]
        except KeyError:
            return web.Response(status=400, text=f"unknown signal {body.get('Signal')!r}")
        # allocRunner.Signal: a "Signaling" event, then the signal.
        self._event(alloc, "Signaling", "Task being sent a signal", Details={"signal": number.name})
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(number)
        return self._json({})

    # Variables.

    async def _variable(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        namespace = request.query.get("namespace") or "default"
        if not _VAR_PATH.match(path):
            return web.Response(status=400, text=f"invalid path {path!r}")
        key = (namespace, path)
        if request.method == "GET":
            var = self._vars.get(key)
            if var is None:
                return web.Response(status=404, text="variable not found")
            return self._json(var, var["ModifyIndex"])
        if request.method == "DELETE":
            self._vars.pop(key, None)
            self._bump()
            return web.Response(status=200)
        if request.method not in ("PUT", "POST"):
            return web.Response(status=405, text="method not allowed")
        body = await request.json()
        try:
            check_fields(body, "Variable")
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        items = body.get("Items")
        if not isinstance(items, dict) or not items:
            return web.Response(status=400, text="variable missing required Items object")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
            return web.Response(status=400, text="variable items must be strings")
        previous = self._vars.get(key)
        index = self._bump()
        var = {
            "Namespace": namespace,
            "Path": path,
            "Items": dict(items),
            "CreateIndex": previous["CreateIndex"] if previous else index,
            "ModifyIndex": index,
            "CreateTime": previous["CreateTime"] if previous else time.time_ns(),
            "ModifyTime": time.time_ns(),
        }
        self._vars[key] = var
        return self._json(var, index)

    # The client: files and logs.

    async def _list_files(self, request: web.Request) -> web.Response:
        """fs/ls: the AllocFileInfo of every entry of ``?path`` in the
        allocation directory (api/fs.go)."""
        alloc = self._allocs.get(request.match_info["id"])
        if alloc is None:
            return web.Response(status=404, text=f"Unknown allocation {request.match_info['id']!r}")
        relative = (request.query.get("path") or "/").strip("/")
        directory = (alloc.dir / relative).resolve()
        if not directory.is_relative_to(alloc.dir.resolve()):
            return web.Response(status=400, text="path escapes the allocation directory")
        try:
            entries = sorted(directory.iterdir())
        except OSError as exc:
            return web.Response(status=500, text=str(exc))
        listing = []
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # rotated away meanwhile
                info = entry.stat()
                listing.append(
                    {
                        "Name": entry.name,
                        "IsDir": entry.is_dir(),
                        "Size": info.st_size,
                        "FileMode": stat.filemode(info.st_mode),
                        "ModTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.st_mtime)),
                        "ContentType": "",
                    }
                )
        return self._json(listing)

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        alloc = self._allocs.get(request.match_info["id"])
        if alloc is None:
            return web.Response(status=404, text=f"Unknown allocation {request.match_info['id']!r}")
        query = request.query
        task_name = query.get("task") or ""
        kind = query.get("type") or ""
        origin = query.get("origin") or "start"
        if not task_name:
            return web.Response(status=400, text="must include task name")
        if kind not in ("stdout", "stderr"):
            return web.Response(status=400, text="must include type of logs")
        if origin not in ("start", "end"):
            return web.Response(status=400, text="origin must be start or end")
        if task_name != alloc.task.name:
            return web.Response(status=404, text=f"task group does not have task {task_name!r}")
        if alloc.task.started_at is None:
            return web.Response(
                status=404, text=f"task {task_name!r} not started yet. No logs available"
            )
        plain = _go_bool(query.get("plain"))
        response = web.StreamResponse()
        response.content_type = "text/plain" if plain else "application/json"
        await response.prepare(request)
        self.log_connections += 1
        stream = _LogStream(
            self,
            request,
            response,
            alloc.dir / "alloc" / "logs",
            f"{task_name}.{kind}.",
            plain=plain,
            follow=_go_bool(query.get("follow")),
        )
        current = asyncio.current_task()
        assert current is not None
        self._streams.add(current)
        try:
            await stream.run(int(query.get("offset") or 0), origin)
        except (ConnectionResetError, _Cut):
            return response
        finally:
            self._streams.discard(current)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


class _Cut(Exception):
    pass


class _Framer:
    """Nomad's StreamFramer (client/lib/streamframer/framer.go, v1.6.0-v1.9.7)
    for one response, driven by ``_LogStream`` instead of goroutines.

    ``send`` takes a read of a file and the file offset just past it. Reads
    of one file merge into the current frame, which keeps the offset of the
    first read merged; a frame reaching ``frame_bytes`` goes out at once and
    its offset grows by the size sent; ``tick`` (every ``batch_seconds``, 200
    ms in Nomad) sends whatever is pending. So a frame's ``Offset`` is not the
    end of its ``Data``, before it or after it.
    """

    def __init__(self, frame_bytes: int) -> None:
        self._frame_bytes = frame_bytes
        self._frame: dict[str, Any] | None = None  # Offset, File, FileEvent
        self._data = bytearray()
        self.out: list[dict[str, Any]] = []

    def send(self, file: str, event: str, data: bytes, offset: int) -> None:
        if self._frame is not None and (
            self._frame["File"] != file or self._frame["FileEvent"] != event
        ):
            self.tick()
        if self._frame is None:
            self._frame = {"Offset": offset, "File": file, "FileEvent": event}
        self._data += data
        force = not self._data and event != ""
        while len(self._data) >= self._frame_bytes or force:
            force = False
            chunk = self._take()
            self.out.append({**self._frame, "Data": chunk})
            self._frame["Offset"] += len(chunk)

    def tick(self) -> None:
        """The batch window's flush (``send()`` in framer.go)."""
        if self._frame is not None:
            self.out.append({**self._frame, "Data": self._take()})
            self._frame = None

    def destroy(self) -> None:
        """The last frame, sent only when it holds data."""
        if self._frame is not None and self._data:
            self.tick()
        self._frame = None

    def _take(self) -> bytes:
        chunk = bytes(self._data[: self._frame_bytes])
        del self._data[: self._frame_bytes]
        return chunk


def _demand(tasks: list[dict[str, Any]]) -> tuple[int, int]:
    """CPU MHz and memory MB the tasks ask for, with Nomad's defaults (100, 300)."""
    cpu = sum(int((t.get("Resources") or {}).get("CPU") or 100) for t in tasks)
    memory = sum(int((t.get("Resources") or {}).get("MemoryMB") or 300) for t in tasks)
    return cpu, memory


def _exists(path: Path) -> bool:
    return path.exists()


def _encode_frame(frame: Mapping[str, Any]) -> bytes:
    """A StreamFrame as Nomad's JSON codec writes it: fields in struct order,
    empty ones left out (``omitempty``), Data in base64, no separator."""
    out: dict[str, Any] = {}
    if frame.get("Offset"):
        out["Offset"] = frame["Offset"]
    if frame.get("Data"):
        out["Data"] = base64.b64encode(frame["Data"]).decode()
    if frame.get("File"):
        out["File"] = frame["File"]
    if frame.get("FileEvent"):
        out["FileEvent"] = frame["FileEvent"]
    return json.dumps(out, separators=(",", ":")).encode()


class _LogStream:
    """One fs/logs response, after Nomad's client/fs_endpoint.go (``logsImpl``
    picks the files, ``streamFile`` reads each) and the framer above."""

    def __init__(
        self,
        double: NomadDouble,
        request: web.Request,
        response: web.StreamResponse,
        logs: Path,
        prefix: str,
        *,
        plain: bool,
        follow: bool,
    ) -> None:
        self._double = double
        self._request = request
        self._response = response
        self._logs = logs
        self._prefix = prefix
        self._plain = plain
        self._follow = follow
        self._sent = 0
        self._framer = _Framer(double.frame_bytes)
        now = time.monotonic()
        self._next_flush = now + double.batch_seconds
        self._next_heartbeat = now + double.heartbeat_seconds

    def _files(self) -> list[tuple[int, Path]]:
        found = []
        for path in self._logs.iterdir():
            suffix = path.name.removeprefix(self._prefix)
            if suffix != path.name and suffix.isdigit():
                found.append((int(suffix), path))
        return sorted(found)

    def _closest(self, wanted: int, offset: int) -> tuple[int, Path, int]:
        """``findClosest``: the file and offset that ``offset`` (counted from
        file ``wanted``, or back from its end when negative) falls in."""
        files = self._files()
        if not files:
            raise FileNotFoundError(self._prefix)
        i = next((n for n, (idx, _) in enumerate(files) if idx >= wanted), len(files) - 1)
        while True:
            size = files[i][1].stat().st_size
            if offset == 0:
                break
            if offset < 0:
                if size + offset >= 0 or i == 0:
                    offset = max(size + offset, 0)
                    break
                offset += size
                i -= 1
            else:
                if offset <= size:
                    break
                if i == len(files) - 1:
                    offset = size
                    break
                offset -= size
                i += 1
        return files[i][0], files[i][1], offset

    async def run(self, offset: int, origin: str) -> None:
        wanted = 0 if origin == "start" else 1 << 62
        if origin == "end":
            offset = -offset
        while True:
            last_index = None if self._follow else self._files()[-1][0]
            index, path, position = self._closest(wanted, offset)
            if last_index is not None and index > last_index:
                break
            at_end = index == last_index
            await self._stream_file(index, path, position, cancel_after_first_eof=at_end)
            if at_end:
                break
            offset, wanted = 0, index + 1
        self._framer.destroy()
        await self._pump()

    async def _stream_file(
        self, index: int, path: Path, offset: int, *, cancel_after_first_eof: bool
    ) -> None:
        name = f"alloc/logs/{path.name}"
        read_bytes = self._double.read_bytes
        cancel_received = cancel_after_first_eof
        try:
            file = path.open("rb")
        except FileNotFoundError:
            return  # rotated out from under us: logsImpl lists the files again
        with file:
            file.seek(offset)
            while True:
                data = file.read(read_bytes)
                if data:
                    offset += len(data)
                    self._send(name, "", data, offset)
                    await self._pump()
                    if len(data) == read_bytes:
                        continue
                if cancel_received:
                    return
                # At the end of the file: wait for it to grow, to be deleted,
                # or for its successor (then read once more and stop).
                while True:
                    await asyncio.sleep(0.01)
                    await self._pump()
                    if os.fstat(file.fileno()).st_size > offset:
                        break
                    if not _exists(path):
                        self._send(name, "file deleted", b"", offset)
                        await self._pump()
                        return
                    if any(idx > index for idx, _ in self._files()):
                        cancel_received = True
                        break

    def _send(self, name: str, event: str, data: bytes, offset: int) -> None:
        if self._plain:
            self._framer.out.append({"Data": data})
        else:
            self._framer.send(name, event, data, offset)

    async def _pump(self) -> None:
        """Run the framer's tickers, then write every frame it made."""
        now = time.monotonic()
        if now >= self._next_flush:
            self._framer.tick()
            self._next_flush = now + self._double.batch_seconds
        if now >= self._next_heartbeat and not self._plain:
            self._framer.out.append({})
            self._next_heartbeat = now + self._double.heartbeat_seconds
        frames, self._framer.out = self._framer.out, []
        for frame in frames:
            await self._write_frame(frame)

    async def _write_frame(self, frame: Mapping[str, Any]) -> None:
        data = frame.get("Data") or b""
        if self._plain:
            await self._response.write(data)
            return
        encoded = _encode_frame(frame)
        cut = self._double.cut_log_streams_after
        if cut is not None and data and self._sent >= cut:
            await self._response.write(encoded[: len(encoded) // 2])
            transport = self._request.transport
            if transport is not None:
                transport.close()
            self._double.log_stream_cuts += 1
            raise _Cut
        await self._response.write(encoded)
        self._sent += len(data)


def _collect(
    pipe: IO[bytes] | None, logs: Path, task: str, kind: str, rotate: int, max_files: int
) -> None:
    """Nomad's log collector: copy a pipe into rotated ``<task>.<kind>.<n>`` files."""
    assert pipe is not None
    index, size = 0, 0
    out = (logs / f"{task}.{kind}.0").open("ab")
    try:
        while chunk := os.read(pipe.fileno(), 65536):
            while chunk:
                if size >= rotate:
                    out.close()
                    index, size = index + 1, 0
                    out = (logs / f"{task}.{kind}.{index}").open("ab")
                    stale = logs / f"{task}.{kind}.{index - max_files}"
                    stale.unlink(missing_ok=True)
                part, chunk = chunk[: rotate - size], chunk[rotate - size :]
                out.write(part)
                out.flush()
                size += len(part)
    finally:
        out.close()
        pipe.close()


def check_driver_config(driver: str, config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` the way a Nomad driver fails a task whose
    ``Config`` has a key its task config spec lacks."""
    known = _DRIVER_CONFIG.get(driver)
    if known is None:
        return
    for key in config:
        if key not in known:
            raise ValueError(
                f"failed to decode driver config: Unsupported argument: "
                f"An argument named {key!r} is not expected here."
            )


def check_fields(value: Any, struct: str, where: str = "") -> None:
    """Raise ``ValueError`` naming the first key of ``value`` that Nomad's
    ``api.<struct>`` has no field for (Nomad would drop it), or a value Go's
    encoding/json could not decode into its field's type."""
    where = where or struct
    if value is None:
        return  # every struct field the launcher sends is a pointer or a slice
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object for api.{struct}")
    fields = _API_STRUCTS[struct]
    for key, item in value.items():
        kind = fields.get(key)
        if kind is None:
            raise ValueError(
                f"{where}: api.{struct} has no field {key!r}; Nomad would silently drop it"
            )
        _check_kind(item, kind, f"{where}.{key}")


def _check_kind(value: Any, kind: str, where: str) -> None:
    if value is None or kind == "any":
        return
    if kind.startswith("["):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a JSON array")
        for i, item in enumerate(value):
            check_fields(item, kind[1:-1], f"{where}[{i}]")
        return
    if kind in _API_STRUCTS:
        check_fields(value, kind, where)
        return
    ok = {
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "dur": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "strs": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "strmap": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    }[kind]
    if not ok(value):
        raise ValueError(f"{where}: json: cannot unmarshal {json.dumps(value)[:40]} into {kind}")


def _validate_job(job: Any) -> None:
    if not isinstance(job, dict) or not job.get("ID"):
        raise ValueError("missing job ID")
    groups = job.get("TaskGroups")
    if not isinstance(groups, list) or not groups:
        raise ValueError("missing job task groups")
    for group in groups:
        tasks = group.get("Tasks")
        if not group.get("Name") or not isinstance(tasks, list) or len(tasks) != 1:
            raise ValueError("the double runs groups of exactly one named task")
        task = tasks[0]
        if not task.get("Name") or not task.get("Driver"):
            raise ValueError("task without Name or Driver")
        config = task.get("Config") or {}
        if not config.get("command"):
            raise ValueError(f"task {task['Name']}: missing command")
        if task["Driver"] == "docker" and not config.get("image"):
            raise ValueError(f"task {task['Name']}: missing image")


def _go_bool(value: str | None) -> bool:
    """Go's strconv.ParseBool, which Nomad reads boolean parameters with."""
    if value in (None, "", "0", "f", "F", "false", "FALSE", "False"):
        return False
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    raise web.HTTPBadRequest(text=f"invalid boolean {value!r}")


def _interpolate(text: str, env: Mapping[str, str]) -> str:
    return _INTERPOLATION.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _duration(text: str) -> float:
    """A Go duration such as 300ms, 5s, 1m30s, in seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise web.HTTPBadRequest(text=f"invalid wait {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Templates: the subset Conveyor emits.

_ACTION_WITH_VAR = re.compile(r'^with\s+nomadVar\s+"([^"]*)"$')


def _render(text: str, left: str, right: str, lookup: Callable[[str], dict[str, str]]) -> str:
    tokens: list[tuple[bool, str]] = []  # (is_action, text)
    rest = text
    while left in rest:
        before, _, after = rest.partition(left)
        action, found, rest = after.partition(right)
        if not found:
            raise _TemplateError("unclosed action")
        tokens += [(False, before), (True, action.strip())]
    tokens.append((False, rest))
    nodes, stop = _parse(tokens, 0)
    if stop != len(tokens):
        raise _TemplateError("unexpected {{ end }}")
    out: list[str] = []
    _execute(nodes, None, lookup, out)
    return "".join(out)


def _parse(tokens: list[tuple[bool, str]], i: int) -> tuple[list[tuple[Any, ...]], int]:
    """Nodes from ``i`` up to the next ``end`` (or the last token); its position."""
    nodes: list[tuple[Any, ...]] = []
    while i < len(tokens):
        is_action, token = tokens[i]
        if not is_action:
            nodes.append(("text", token))
        elif token == "end":
            return nodes, i
        elif (match := _ACTION_WITH_VAR.match(token)) or token == "range .Tuples":
            body, end = _parse(tokens, i + 1)
            if end == len(tokens):
                raise _TemplateError(f"{{{{ {token} }}}} has no {{{{ end }}}}")
            nodes.append(("with", match.group(1), body) if match else ("range", body))
            i = end
        elif token == ".K":
            nodes.append(("key",))
        elif token in (".V | toJSON", ".V | toUnescapedJSON"):
            nodes.append(("value", token.endswith("toJSON")))
        else:
            raise _TemplateError(f"the double does not support {{{{ {token} }}}}")
        i += 1
    return nodes, i


def _execute(
    nodes: list[tuple[Any, ...]],
    dot: Any,
    lookup: Callable[[str], dict[str, str]],
    out: list[str],
) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "with":
            _execute(node[2], lookup(node[1]), lookup, out)
        elif node[0] == "range":
            for key in sorted(dot or {}):
                _execute(node[1], (key, dot[key]), lookup, out)
        elif node[0] == "key":
            out.append(dot[0])
        else:
            out.append(_go_json(dot[1], escape_html=node[1]))


def _go_json(value: str, *, escape_html: bool) -> str:
    """A string as Go's json.Marshal writes it."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif code < 0x20 or ch in "\u2028\u2029" or (escape_html and ch in "<>&"):
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _parse_env(text: str) -> dict[str, str]:
    """hashicorp/go-envparse, which Nomad reads env templates with."""
    env = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            key, value = _parse_env_line(line)
        except ValueError as exc:
            raise ValueError(f"error on line {number}: {exc}") from None
        env[key] = value
    return env


def _parse_env_line(line: str) -> tuple[str, str]:
    key, sep, value = line.partition("=")
    if not sep:
        raise ValueError('missing "="')
    key, value = key.strip().removeprefix("export "), value.strip()
    if not key or not (key[0].isascii() and (key[0].isalpha() or key[0] == "_")):
        raise ValueError(f"key must start with [A-Za-z_] but found {key[:1]!r}")
    out: list[str] = []
    mode = "normal"
    for ch in value:
        if ord(ch) < 32:
            raise ValueError(f"0x{ord(ch):02x} is an invalid value character")
        if mode == "normal":
            if ch == '"':
                mode = "double"
            elif ch == "'":
                mode = "single"
            elif ch == "#":
                return key, "".join(out).rstrip(" \t")
            else:
                out.append(ch)
        elif mode == "double":
            if ch == '"':
                mode = "normal"
            elif ch == "\\":
                mode = "escape"
            else:
                out.append(ch)
        elif mode == "escape":
            escapes = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
            if ch not in escapes:
                raise ValueError(f"invalid escape sequence: {ch}")
            out.append(escapes[ch])
            mode = "double"
        elif ch == "'":
            mode = "normal"
        else:
            out.append(ch)
    if mode != "normal":
        raise ValueError("unmatched quote or incomplete escape")
    return key, "".join(out)
