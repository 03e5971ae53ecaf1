"""The Nomad batch job that runs one build, and what Nomad says about it.

Pure: ``build_job`` turns a ``JobSpec`` into the JSON job the jobs API takes
(developer.hashicorp.com/nomad/api-docs/json-jobs); ``placement_failure``,
``task_result`` and the event readers turn evaluations and task states back
into Conveyor's terms. ``runner.launchers.nomad_logs`` reads log streams and
``runner.launchers.nomad`` does the talking.

The secret part of the environment never enters the job: it lives in a Nomad
Variable at ``nomad/jobs/<job id>`` (which only that job's tasks may read) and a
template renders it into the task's environment. The script reaches the task
as a template too, so it never passes through Nomad's ``${...}`` interpolation.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from common.settings import ConfigError, choice, flag, listed, number
from runner.launchers.base import JobResult, JobSpec, LaunchError

Driver = Literal["docker", "exec", "raw_exec"]
DRIVERS: tuple[Driver, ...] = ("docker", "exec", "raw_exec")

GROUP = "build"
TASK = "build"
SCRIPT_DEST = "local/build.sh"
SECRETS_DEST = "secrets/env"

_NS_PER_SECOND = 1_000_000_000
# Nomad variable paths allow only these characters; the build ID is part of one.
_BUILD_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
# Node meta keys as `${meta.<key>}` can address them.
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# go-envparse, which reads the rendered env file, accepts only these names.
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# toUnescapedJSON writes these as \uXXXX (or \r), which go-envparse rejects;
# \n and \t are the only control characters that survive the round trip.
_UNPASSABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")

# `toUnescapedJSON` rather than `toJSON`: toJSON HTML-escapes & < > into
# \u0026..., and Nomad's env-file parser (go-envparse) understands only
# \\ \" \n \t, so a password containing "&" would fail the task.
SECRETS_TEMPLATE = (
    '{{ with nomadVar "%s" }}{{ range .Tuples }}'
    "{{ .K }}={{ .V | toUnescapedJSON }}\n"
    "{{ end }}{{ end }}"
)


@dataclass(frozen=True)
class NomadSettings:
    """How to reach Nomad and what every build job looks like.

    Build it with ``from_env`` from the same variables the ``nomad`` CLI reads.
    ``kill_timeout_seconds`` is the job's KillTimeout: after a stop Nomad sends
    SIGTERM, waits that long, then SIGKILL (capped by the client's
    ``max_kill_timeout``, 30 s unless the operator raised it).
    ``startup_timeout_seconds`` bounds how long a build may wait, after it was
    launched, for Nomad to find capacity for it. ``log_drain_seconds`` is how long a
    log stream must stay quiet after the task died before it counts as
    complete (Nomad's log collector may still be writing the last bytes).
    """

    address: str = "http://127.0.0.1:4646"
    token: str | None = None
    namespace: str | None = None
    region: str | None = None
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    skip_verify: bool = False
    driver: Driver = "docker"
    image: str = "buildpack-deps:bookworm-scm"
    shell_path: str = "/bin/bash"
    datacenters: tuple[str, ...] = ("*",)
    priority: int = 50
    kill_timeout_seconds: float = 10.0
    log_max_files: int = 10
    log_max_file_mb: int = 20
    purge_on_exit: bool = True
    request_timeout_seconds: float = 10.0
    blocking_wait_seconds: float = 30.0
    log_drain_seconds: float = 0.5
    unreachable_seconds: float = 120.0
    startup_timeout_seconds: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NomadSettings:
        """Read NOMAD_ADDR, NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_REGION, NOMAD_CACERT,
        NOMAD_CLIENT_CERT, NOMAD_CLIENT_KEY, NOMAD_SKIP_VERIFY and Conveyor's
        CONVEYOR_NOMAD_{DRIVER,IMAGE,SHELL,DATACENTERS,KILL_TIMEOUT,STARTUP_TIMEOUT}.

        Raises ``ConfigError`` naming the variable that holds a bad value.
        """
        default = cls()
        driver = choice(env, "CONVEYOR_NOMAD_DRIVER", default.driver, DRIVERS)
        datacenters = listed(env, "CONVEYOR_NOMAD_DATACENTERS")
        kill_timeout_seconds = _seconds(env, "CONVEYOR_NOMAD_KILL_TIMEOUT")
        startup_timeout_seconds = _seconds(env, "CONVEYOR_NOMAD_STARTUP_TIMEOUT")
        return cls(
            address=env.get("NOMAD_ADDR") or default.address,
            token=env.get("NOMAD_TOKEN") or None,
            namespace=env.get("NOMAD_NAMESPACE") or None,
            region=env.get("NOMAD_REGION") or None,
            ca_cert=env.get("NOMAD_CACERT") or None,
            client_cert=env.get("NOMAD_CLIENT_CERT") or None,
            client_key=env.get("NOMAD_CLIENT_KEY") or None,
            skip_verify=flag(env, "NOMAD_SKIP_VERIFY"),
            driver=driver,
            image=env.get("CONVEYOR_NOMAD_IMAGE") or default.image,
            shell_path=env.get("CONVEYOR_NOMAD_SHELL") or default.shell_path,
            datacenters=datacenters or default.datacenters,
            kill_timeout_seconds=(
                default.kill_timeout_seconds
                if kill_timeout_seconds is None
                else kill_timeout_seconds
            ),
            startup_timeout_seconds=(
                default.startup_timeout_seconds
                if startup_timeout_seconds is None
                else startup_timeout_seconds
            ),
        )


def _seconds(env: Mapping[str, str], name: str) -> float | None:
    """A non-negative number of seconds from ``env[name]``, or None when unset.
    Raises ``ConfigError`` naming the variable."""
    if not env.get(name, "").strip():
        return None
    seconds = number(env, name, 0.0)
    if seconds < 0:
        raise ConfigError(name, f"must not be negative, not {seconds:g}")
    return seconds


def job_id(build_id: str) -> str:
    """The Nomad job ID of a build. Raises ``LaunchError`` for a build ID that
    cannot be part of a job ID and variable path."""
    if not _BUILD_ID.match(build_id):
        raise LaunchError(f"build id {build_id!r} is not usable as a Nomad job id")
    return f"conveyor-build-{build_id}"


def variable_path(nomad_job_id: str) -> str:
    """The Variable holding a job's secrets; Nomad lets only that job read it."""
    return f"nomad/jobs/{nomad_job_id}"


def check_secrets(secret_env: Mapping[str, str]) -> None:
    """Raise ``LaunchError`` (naming the variable, never the value) for a
    secret the env template cannot carry to the task unchanged."""
    for name, value in secret_env.items():
        if not _ENV_NAME.match(name):
            raise LaunchError(f"secret name {name!r} is not a valid environment variable name")
        if _UNPASSABLE.search(value):
            raise LaunchError(
                f"secret {name} contains a control character other than newline or tab, "
                "which Nomad cannot pass through a task's environment"
            )


def build_job(spec: JobSpec, settings: NomadSettings) -> dict[str, Any]:
    """The JSON job (the value of ``{"Job": ...}``) for one build.

    Raises ``LaunchError`` for a build ID, label or secret Nomad cannot carry.
    The result holds no secret values, only the path of the Variable that does.
    """
    nomad_job_id = job_id(spec.build_id)
    check_secrets(spec.secret_env)
    constraints = []
    for key, value in sorted(spec.labels.items()):
        if not _LABEL_KEY.match(key):
            raise LaunchError(f"runner label {key!r} cannot name a Nomad node meta key")
        constraints.append({"LTarget": f"${{meta.{key}}}", "RTarget": value, "Operand": "="})

    templates: list[dict[str, Any]] = [_script_template(spec.script)]
    if spec.secret_env:
        templates.append(
            {
                "EmbeddedTmpl": SECRETS_TEMPLATE % variable_path(nomad_job_id),
                "DestPath": SECRETS_DEST,
                # api.Template's field is Envvars (HCL's `env`); Nomad drops
                # an unknown key without a word, so a misspelling leaves every
                # secret unset.
                "Envvars": True,
                # Deleting the Variable when the job ends must not restart it.
                "ChangeMode": "noop",
            }
        )

    resources: dict[str, int] = {}
    if spec.limits.cpu_mhz > 0:
        resources["CPU"] = spec.limits.cpu_mhz
    if spec.limits.memory_mb > 0:
        resources["MemoryMB"] = spec.limits.memory_mb
    group: dict[str, Any] = {
        "Name": GROUP,
        "Count": 1,
        # A build runs once: a retry is a new build, decided by the control plane.
        "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
        "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
        "Tasks": [
            {
                "Name": TASK,
                "Driver": settings.driver,
                "Config": _driver_config(spec, settings),
                "Env": dict(spec.env),
                "Templates": templates,
                "Resources": resources,
                "KillTimeout": round(settings.kill_timeout_seconds * _NS_PER_SECOND),
                "KillSignal": "SIGTERM",
                "LogConfig": {
                    "MaxFiles": settings.log_max_files,
                    "MaxFileSizeMB": settings.log_max_file_mb,
                },
            }
        ],
    }
    if spec.limits.disk_mb > 0:
        group["EphemeralDisk"] = {"SizeMB": spec.limits.disk_mb}
    job: dict[str, Any] = {
        "ID": nomad_job_id,
        "Name": nomad_job_id,
        "Type": "batch",
        "Datacenters": list(settings.datacenters),
        "Priority": settings.priority,
        "Constraints": constraints,
        "Meta": {"conveyor_build_id": spec.build_id},
        "TaskGroups": [group],
    }
    if settings.namespace:
        job["Namespace"] = settings.namespace
    if settings.region:
        job["Region"] = settings.region
    return job


def _script_template(script: str) -> dict[str, Any]:
    # Delimiters the script cannot contain (they embed its own digest) make the
    # template engine copy it verbatim, whatever `{{` it holds.
    digest = hashlib.sha256(script.encode()).hexdigest()[:24]
    left, right = f"[[conveyor-{digest}", f"{digest}-conveyor]]"
    if left in script or right in script:
        raise LaunchError("the build script contains the launcher's template delimiter")
    return {
        "EmbeddedTmpl": script,
        "DestPath": SCRIPT_DEST,
        "Perms": "0755",
        "LeftDelim": left,
        "RightDelim": right,
        "ChangeMode": "noop",
    }


def _driver_config(spec: JobSpec, settings: NomadSettings) -> dict[str, Any]:
    script = "${NOMAD_TASK_DIR}/build.sh"
    args = [script]
    if spec.limits.cpu_seconds > 0:
        # No driver limits CPU time; bash's ulimit does, inherited by the script.
        args = ["-c", f'ulimit -t {spec.limits.cpu_seconds} && exec "$0" "$1"', settings.shell_path]
        args.append(script)
    config: dict[str, Any] = {"command": settings.shell_path, "args": args}
    if settings.driver == "docker":
        # tini as PID 1 forwards SIGTERM to the script; PID 1 bash would ignore it.
        config.update(image=settings.image, init=True)
        if not spec.network:
            config["network_mode"] = "none"
        if spec.limits.max_processes > 0:
            config["pids_limit"] = spec.limits.max_processes
        if spec.local_paths:
            config["mount"] = [
                {"type": "bind", "source": path, "target": path, "readonly": True}
                for path in spec.local_paths
            ]
    return config


def placement_failure(evaluation: Mapping[str, Any]) -> str | None:
    """Why Nomad could not place the job, in the words of ``nomad eval status``,
    or None when the evaluation placed everything it was asked to."""
    failed = evaluation.get("FailedTGAllocs") or {}
    if not failed:
        return None
    reasons: list[str] = []
    for _group, metric in sorted(failed.items()):
        reasons.extend(_metric_reasons(metric or {}))
    return "; ".join(dict.fromkeys(reasons)) or "no node can run the job"


def waits_for_capacity(evaluation: Mapping[str, Any]) -> bool:
    """Whether Nomad queued the job until capacity frees up: it made a
    blocked evaluation (``BlockedEval``) and some node that passed the
    constraints lacked resources or quota. When every node was filtered out
    instead (a label no node has, a missing driver), nothing the cluster
    finishes will make room, so the build should fail now."""
    if not evaluation.get("BlockedEval"):
        return False
    for metric in (evaluation.get("FailedTGAllocs") or {}).values():
        metric = metric or {}
        if (
            metric.get("NodesExhausted")
            or metric.get("DimensionExhausted")
            or metric.get("ClassExhausted")
            or metric.get("QuotaExhausted")
        ):
            return True
    return False


def _metric_reasons(metric: Mapping[str, Any]) -> list[str]:
    reasons = []
    if not metric.get("NodesEvaluated"):
        reasons.append("no nodes were eligible for evaluation")
    for dc, available in sorted((metric.get("NodesAvailable") or {}).items()):
        if not available:
            reasons.append(f"no nodes are available in datacenter {dc!r}")
    for cls, count in sorted((metric.get("ClassFiltered") or {}).items()):
        reasons.append(f"class {cls!r}: {count} nodes excluded by filter")
    for constraint, count in sorted((metric.get("ConstraintFiltered") or {}).items()):
        reasons.append(f"constraint {constraint!r}: {count} nodes excluded by filter")
    if metric.get("NodesExhausted"):
        reasons.append(f"resources exhausted on {metric['NodesExhausted']} nodes")
    for dim, count in sorted((metric.get("DimensionExhausted") or {}).items()):
        reasons.append(f"dimension {dim!r} exhausted on {count} nodes")
    for quota in metric.get("QuotaExhausted") or []:
        reasons.append(f"quota limit hit {quota!r}")
    return reasons


def task_events(alloc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The build task's events so far, oldest first."""
    state = (alloc.get("TaskStates") or {}).get(TASK) or {}
    return list(state.get("Events") or [])


def task_started(alloc: Mapping[str, Any]) -> bool:
    """Whether the task ever started, so that it has logs to read.

    Nomad keeps only a task's last 10 events (``defaultMaxEvents`` in
    client/allocrunner/taskrunner/task_runner.go), so the ``Started`` event
    may be gone; ``StartedAt``, which the fs/logs endpoint itself checks,
    stays set once the task started.
    """
    state = (alloc.get("TaskStates") or {}).get(TASK) or {}
    started_at = str(state.get("StartedAt") or "")
    if started_at and not started_at.startswith("0001-01-01"):
        return True
    return any(event.get("Type") == "Started" for event in task_events(alloc))


class EventCursor:
    """Picks the task events not yet reported out of the last 10 that Nomad
    keeps: an index into the list would stop at 10 once the oldest are
    dropped. Events come in order of ``Time`` (Unix nanoseconds); events
    sharing one ``Time`` are told apart by how many of them were taken."""

    def __init__(self) -> None:
        self._last_time: int | None = None
        self._taken_at_last = 0

    def take_new(self, alloc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The build task's events that no earlier call returned, oldest first."""
        fresh: list[Mapping[str, Any]] = []
        seen_at_last = 0
        for event in task_events(alloc):
            at = _as_int(event.get("Time")) or 0
            if self._last_time is not None and at < self._last_time:
                continue
            if at == self._last_time:
                seen_at_last += 1
                if seen_at_last <= self._taken_at_last:
                    continue
            fresh.append(event)
        for event in fresh:
            at = _as_int(event.get("Time")) or 0
            if at == self._last_time:
                self._taken_at_last += 1
            else:
                self._last_time, self._taken_at_last = at, 1
        return fresh


def describe_event(event: Mapping[str, Any]) -> str:
    """One line for a task event, as ``nomad alloc status`` shows it."""
    message = str(
        event.get("DisplayMessage")
        or event.get("Message")
        or event.get("DriverError")
        or event.get("SetupError")
        or event.get("ValidationError")
        or event.get("KillReason")
        or event.get("DriverMessage")
        or ""
    )
    kind = str(event.get("Type") or "event")
    return f"{kind}: {message}" if message else kind


# Events after which the task cannot have run the script to its end.
_FAILURES = frozenset(
    {
        "Setup Failure",
        "Driver Failure",
        "Failed Validation",
        "Failed Artifact Download",
        "Task hook failed",
    }
)


def task_result(alloc: Mapping[str, Any], *, stop_requested: bool) -> JobResult | None:
    """How the build task ended, or None while it has not ended.

    ``stop_requested`` says the launcher deregistered the job: a kill is then
    the expected end rather than Nomad's own doing.
    """
    client_status = alloc.get("ClientStatus")
    if client_status == "lost":
        return JobResult(None, error="allocation lost: its Nomad client stopped responding")
    state = (alloc.get("TaskStates") or {}).get(TASK) or {}
    terminal_alloc = client_status in ("complete", "failed")
    if state.get("State") != "dead" and not terminal_alloc:
        return None
    events = task_events(alloc)
    exit_code: int | None = None
    error: str | None = None
    killed = False
    for event in events:
        kind = event.get("Type")
        if kind == "Terminated":
            exit_code = _exit_code(event)
        elif kind in ("Killing", "Killed"):
            killed = True
            if event.get("FailsTask") and not stop_requested and error is None:
                error = describe_event(event)
        elif kind in _FAILURES and error is None:
            error = describe_event(event)
    if not events and terminal_alloc and not stop_requested:
        error = f"allocation {client_status} before its task ran"
    # A stop that came after the task had ended on its own killed nothing.
    killed = killed or (stop_requested and exit_code is None)
    return JobResult(exit_code=exit_code, error=error, killed=killed)


def _exit_code(event: Mapping[str, Any]) -> int | None:
    details = event.get("Details") or {}
    signal = _as_int(details.get("signal", event.get("Signal")))
    if signal:
        # Ended by a signal: there is no exit status, only 128+N by convention.
        return None
    return _as_int(details.get("exit_code", event.get("ExitCode")))


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def pick_allocation(allocs: Any, eval_id: str) -> str | None:
    """From a job's allocation list, the ID of the one our evaluation made
    (else the newest), or None while there is none."""
    if not isinstance(allocs, list) or not allocs:
        return None
    ours = [a for a in allocs if isinstance(a, dict) and a.get("EvalID") == eval_id]
    newest = max(ours or allocs, key=lambda a: int(a.get("CreateIndex") or 0))
    return str(newest["ID"])


def next_index(old: int, new: int) -> int:
    """The index for the next blocking query after one answered ``new``."""
    # Nomad's advice: reset when the index goes backwards, never block on 0.
    return new if new >= old and new > 0 else 1
