"""The files under deploy/ parse and agree with the code they deploy.

Metric names come from the real declarations (``ControlMetrics`` and
``RunnerMetrics`` against fresh registries), so an alert or a panel that
names a metric the code does not export fails here, not on a pager.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from prometheus_client import CollectorRegistry

from control.metrics import ControlMetrics
from runner.metrics import RunnerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NOMAD_FILES = sorted((DEPLOY / "nomad").glob("*.nomad.hcl"))
RUNNER_POLICY = DEPLOY / "nomad" / "conveyor-runner.policy.hcl"
BUILD_NODE_CLIENT = DEPLOY / "nomad" / "build-node.client.hcl"

REQUIRED_ALERTS = {
    "ConveyorQueuedBuildTooOld",
    "ConveyorBuildsStuckPastDeadline",
    "ConveyorRunnerLost",
    "ConveyorWebhookErrorRatioHigh",
    "ConveyorGrpcErrorRatioHigh",
    "ConveyorDbPoolExhausted",
}
SEVERITIES = {"info", "warning", "critical"}

# Every identifier that starts with conveyor_ is taken for a metric name: the
# deploy files use no label, rule or variable names of that shape.
_METRIC_RE = re.compile(r"\bconveyor_[A-Za-z0-9_:]*")

# Sample names prometheus_client exposes for each metric family type.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def _exposed_names(registry: CollectorRegistry) -> set[str]:
    """Names a scrape of ``registry`` can contain, including label-less families
    that have no samples yet (labelled metrics start out empty)."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def metric_names() -> frozenset[str]:
    control = CollectorRegistry()
    ControlMetrics(control)
    runner = CollectorRegistry()
    RunnerMetrics(runner)
    return frozenset(_exposed_names(control) | _exposed_names(runner))


def _unknown_metrics(expr: str, known: frozenset[str]) -> set[str]:
    return set(_METRIC_RE.findall(expr)) - known


def test_metric_names_come_from_the_declarations(metric_names: frozenset[str]) -> None:
    # Guards the fixture itself: counters gain _total, histograms their series,
    # and a bare counter family name is not something Prometheus can query.
    assert "conveyor_builds_finished_total" in metric_names
    assert "conveyor_build_queue_seconds_bucket" in metric_names
    assert "conveyor_runner_launch_seconds_count" in metric_names
    assert "conveyor_active_builds" in metric_names
    assert "conveyor_builds_finished" not in metric_names


def test_metric_regex_finds_names_in_promql() -> None:
    expr = (
        'sum(rate(conveyor_a_total{job="conveyor-control"}[5m]))'
        " / on() conveyor_b_bucket > $__rate_interval"
    )
    assert set(_METRIC_RE.findall(expr)) == {"conveyor_a_total", "conveyor_b_bucket"}


# --- Nomad -----------------------------------------------------------------


def _unquote(value: Any) -> Any:
    """python-hcl2 8 keeps string quotes and marks blocks; older versions do
    neither. Normalise to plain values so the checks read the same on both."""
    if isinstance(value, dict):
        return {
            _unquote(key): _unquote(item)
            for key, item in value.items()
            if key not in {"__is_block__", "__comments__", "__inline_comments__"}
        }
    if isinstance(value, list):
        return [_unquote(item) for item in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _load_hcl(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        parsed: dict[str, Any] = _unquote(hcl2.load(handle))
    return parsed


def _labelled(blocks: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (label, body) for each block of a labelled block type."""
    for block in blocks:
        yield from block.items()


def _job(path: Path) -> tuple[str, dict[str, Any]]:
    jobs = list(_labelled(_load_hcl(path)["job"]))
    assert len(jobs) == 1, f"{path.name}: expected one job block"
    return jobs[0]


def _groups(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [body for _, body in _labelled(job["group"])]


def _tasks(group: dict[str, Any]) -> list[dict[str, Any]]:
    return [body for _, body in _labelled(group["task"])]


def _services(group: dict[str, Any]) -> list[dict[str, Any]]:
    services = list(group.get("service", []))
    for task in _tasks(group):
        services.extend(task.get("service", []))
    return services


def _variable_default(path: Path, name: str) -> Any:
    for label, body in _labelled(_load_hcl(path).get("variable", [])):
        if label == name:
            return body.get("default")
    raise AssertionError(f"{path.name}: no variable {name!r}")


def _resolve_number(path: Path, value: Any) -> Any:
    """A count written as ``var.x`` resolves to that variable's default."""
    if isinstance(value, str):
        match = re.fullmatch(r"\$\{var\.(\w+)\}|var\.(\w+)", value)
        if match:
            return _variable_default(path, match.group(1) or match.group(2))
    return value


def test_every_nomad_file_parses() -> None:
    names = {path.name for path in NOMAD_FILES}
    assert names >= {
        "conveyor-control.nomad.hcl",
        "conveyor-runner.nomad.hcl",
        "build-job.nomad.hcl",
    }
    for path in NOMAD_FILES:
        _job(path)


def test_control_job_is_a_replicated_service_with_health_checks() -> None:
    path = DEPLOY / "nomad" / "conveyor-control.nomad.hcl"
    name, job = _job(path)
    assert name == "conveyor-control"
    assert job["type"] == "service"
    (group,) = _groups(job)
    assert _resolve_number(path, group["count"]) >= 2

    (update,) = job["update"]
    assert update["auto_revert"] is True
    assert update["canary"] >= 1

    checks = [check for service in _services(group) for check in service.get("check", [])]
    paths = {check.get("path") for check in checks if check["type"] == "http"}
    assert "/readyz" in paths
    assert any(check.get("port") == "grpc" for check in checks), "no check on the gRPC port"

    (task,) = _tasks(group)
    assert task["config"][0]["args"] == ["control", "serve"]
    templates = "\n".join(template["data"] for template in task["template"])
    for key in ("database_url", "secret_key", "admin_token", "runner_token"):
        assert key in templates
    assert task["resources"]


def test_runner_job_is_a_system_job_on_build_nodes() -> None:
    path = DEPLOY / "nomad" / "conveyor-runner.nomad.hcl"
    name, job = _job(path)
    assert name == "conveyor-runner"
    assert job["type"] == "system"
    assert any("conveyor_build_node" in c["attribute"] for c in job["constraint"])

    (group,) = _groups(job)
    assert "metrics" in {label for label, _ in _labelled(group["network"][0]["port"])}
    (task,) = _tasks(group)
    assert task["driver"] == "raw_exec"
    assert task["config"][0]["args"] == ["runner", "start"]
    assert task["kill_signal"] == "SIGTERM"
    assert task["kill_timeout"] == "25m"


def test_runners_find_every_control_replica_through_its_grpc_service() -> None:
    control_path = DEPLOY / "nomad" / "conveyor-control.nomad.hcl"
    runner_path = DEPLOY / "nomad" / "conveyor-runner.nomad.hcl"
    (control_group,) = _groups(_job(control_path)[1])
    grpc_services = [s for s in _services(control_group) if s["port"] == "grpc"]
    assert [s["name"] for s in grpc_services] == [_variable_default(runner_path, "control_service")]

    (group,) = _groups(_job(runner_path)[1])
    (task,) = _tasks(group)
    (env,) = task["env"]
    listed = "${NOMAD_TASK_DIR}/control-addresses"
    assert env["CONVEYOR_CONTROL_ADDR_FILE"] == listed
    (template,) = [t for t in task["template"] if t["destination"] == "local/control-addresses"]
    # A restart would drain the runner's builds: the runner re-reads the file.
    assert template["change_mode"] == "noop"
    (local,) = _load_hcl(runner_path)["locals"]
    assert "local.control_addresses_consul" in template["data"]
    assert "local.control_addresses_nomad" in template["data"]
    assert 'range nomadService \\"${var.control_service}\\"' in local["control_addresses_nomad"]
    assert 'range service \\"${var.control_service}\\"' in local["control_addresses_consul"]
    for text in local.values():
        assert "{{ .Address }}:{{ .Port }}" in text


def test_build_job_runs_once() -> None:
    _, job = _job(DEPLOY / "nomad" / "build-job.nomad.hcl")
    assert job["type"] == "batch"
    assert "conveyor-build-${var.build_id}" in job["id"]

    (group,) = _groups(job)
    (restart,) = group["restart"]
    assert restart["attempts"] == 0
    (reschedule,) = group["reschedule"]
    assert reschedule["attempts"] == 0
    assert reschedule["unlimited"] is False

    (task,) = _tasks(group)
    assert task["config"][0]["args"] == ["${NOMAD_TASK_DIR}/build.sh"]
    destinations = {t["destination"] for t in task["template"]}
    assert "local/build.sh" in destinations
    secrets = [t for t in task["template"] if t["destination"] == "secrets/env"]
    assert len(secrets) == 1
    assert secrets[0]["env"] is True
    assert 'nomadVar "nomad/jobs/conveyor-build-${var.build_id}"' in secrets[0]["data"]


# Nomad's documented defaults and vocabularies (hashicorp/nomad v1.6.0-v1.9.7:
# website/content/docs/configuration/client.mdx `max_kill_timeout`,
# website/content/docs/job-specification/update.mdx, acl/policy.go).
DEFAULT_MAX_KILL_TIMEOUT_SECONDS = 30.0
SYSTEM_JOB_UPDATE_KEYS = {"max_parallel", "stagger"}
NAMESPACE_CAPABILITIES = {
    "deny",
    "list-jobs",
    "parse-job",
    "read-job",
    "submit-job",
    "dispatch-job",
    "read-logs",
    "read-fs",
    "alloc-exec",
    "alloc-node-exec",
    "alloc-lifecycle",
    "sentinel-override",
    "csi-register-plugin",
    "csi-write-volume",
    "csi-read-volume",
    "csi-list-volume",
    "csi-mount-volume",
    "list-scaling-policies",
    "read-scaling-policy",
    "read-job-scaling",
    "scale-job",
    "submit-recommendation",
}
VARIABLE_CAPABILITIES = {"list", "read", "write", "destroy", "deny"}


def _go_duration(text: str) -> float:
    """Seconds in a Go duration such as "25m", "1m30s" or "10s"."""
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _kill_timeout(path: Path, task: dict[str, Any]) -> float:
    value = str(task.get("kill_timeout", "5s"))
    match = re.fullmatch(r"\$\{var\.(\w+)\}s", value)
    if match:  # "${var.grace_seconds}s"
        return float(_variable_default(path, match.group(1)))
    return _go_duration(value)


def test_system_jobs_use_only_the_update_keys_nomad_enforces() -> None:
    for path in NOMAD_FILES:
        _, job = _job(path)
        if job["type"] != "system":
            continue
        blocks = list(job.get("update", []))
        blocks += [u for group in _groups(job) for u in group.get("update", [])]
        for update in blocks:
            ignored = set(update) - SYSTEM_JOB_UPDATE_KEYS
            assert not ignored, f"{path.name}: a system job ignores update {sorted(ignored)}"


def test_kill_timeouts_fit_the_clients_max_kill_timeout() -> None:
    client = _load_hcl(BUILD_NODE_CLIENT)["client"][0]
    build_node_max = _go_duration(client["max_kill_timeout"])
    assert client["meta"][0]["conveyor_build_node"] == "true"
    for path in NOMAD_FILES:
        _, job = _job(path)
        on_build_nodes = any(
            "conveyor_build_node" in c["attribute"] for c in job.get("constraint", [])
        )
        limit = build_node_max if on_build_nodes else DEFAULT_MAX_KILL_TIMEOUT_SECONDS
        for group in _groups(job):
            for task in _tasks(group):
                wanted = _kill_timeout(path, task)
                assert wanted <= limit, (
                    f"{path.name}: kill_timeout {wanted:g} s exceeds the client's "
                    f"max_kill_timeout of {limit:g} s, which would cut it short"
                )


def test_runner_policy_uses_only_nomads_capabilities() -> None:
    policy = _load_hcl(RUNNER_POLICY)
    (namespaces,) = policy["namespace"]
    for _name, rules in namespaces.items():
        assert set(rules["capabilities"]) <= NAMESPACE_CAPABILITIES
        for variables in rules.get("variables", []):
            for _label, body in _labelled(variables["path"]):
                assert set(body["capabilities"]) <= VARIABLE_CAPABILITIES


# --- Prometheus ------------------------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    with (DEPLOY / "prometheus" / "alerts.yml").open(encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_use_only_declared_metrics(metric_names: frozenset[str]) -> None:
    rules = _alert_rules()
    assert rules
    for rule in rules:
        name = rule.get("alert") or rule.get("record")
        used = _METRIC_RE.findall(rule["expr"])
        unknown = _unknown_metrics(rule["expr"], metric_names)
        assert not unknown, f"{name}: unknown metrics {sorted(unknown)}"
        assert used or "up{" in rule["expr"], f"{name}: names no conveyor metric"


def test_required_alerts_exist_with_for_and_severity() -> None:
    alerts = [rule for rule in _alert_rules() if "alert" in rule]
    assert {rule["alert"] for rule in alerts} >= REQUIRED_ALERTS
    for rule in alerts:
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no 'for'"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert annotations.get("description"), f"{name}: no description"


def test_prometheus_scrapes_control_and_runner_jobs() -> None:
    with (DEPLOY / "prometheus" / "prometheus.yml").open(encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # The alerts and the dashboard select on these job names.
    assert set(jobs) >= {"conveyor-control", "conveyor-runner"}
    for name in ("conveyor-control", "conveyor-runner"):
        assert jobs[name]["nomad_sd_configs"]


# --- Grafana ---------------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard() -> dict[str, Any]:
    with (DEPLOY / "grafana" / "conveyor.json").open(encoding="utf-8") as handle:
        dashboard: dict[str, Any] = json.load(handle)
    return dashboard


def test_dashboard_panels_use_only_declared_metrics(metric_names: frozenset[str]) -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    queried = 0
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat", "row"}, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"{panel['title']}: no targets"
        for target in panel["targets"]:
            expr = target["expr"]
            unknown = _unknown_metrics(expr, metric_names)
            assert not unknown, f"{panel['title']}: unknown metrics {sorted(unknown)}"
            assert _METRIC_RE.search(expr), f"{panel['title']}: names no conveyor metric"
            queried += 1
    assert queried


# --- systemd ---------------------------------------------------------------


def _unit(name: str) -> configparser.ConfigParser:
    # strict=False: systemd allows repeated keys (each adds to a list).
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(DEPLOY / "systemd" / name, encoding="utf-8")
    return parser


@pytest.mark.parametrize(
    ("unit", "command"),
    [
        ("conveyor-control.service", ["control", "serve"]),
        ("conveyor-runner.service", ["runner", "start"]),
    ],
)
def test_systemd_units_start_the_right_command(unit: str, command: list[str]) -> None:
    parser = _unit(unit)
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    service = parser["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "conveyor"
    assert argv[1:3] == command
    assert service["Restart"] == "on-failure"
    assert service["User"] not in {"", "root"}
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"


def test_runner_unit_drains_and_leaves_bubblewrap_working() -> None:
    service = _unit("conveyor-runner.service")["Service"]
    assert service["KillMode"] == "mixed"
    assert service["TimeoutStopSec"] == "25min"
    # Either would stop bubblewrap from creating its namespaces (see the unit).
    assert "NoNewPrivileges" not in service
    assert "RestrictNamespaces" not in service


def test_control_unit_forbids_new_privileges() -> None:
    service = _unit("conveyor-control.service")["Service"]
    assert service["NoNewPrivileges"] == "yes"


def test_env_examples_exist() -> None:
    control = (DEPLOY / "systemd" / "conveyor-control.env.example").read_text(encoding="utf-8")
    runner = (DEPLOY / "systemd" / "conveyor-runner.env.example").read_text(encoding="utf-8")
    assert "CONVEYOR_DATABASE_URL=" in control
    assert "CONVEYOR_CONTROL_ADDR=" in runner
