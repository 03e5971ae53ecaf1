"""Every runner-agent metric, declared once against a registry passed in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RunnerMetrics:
    """The runner agent's metrics, served on its own ``/metrics``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.builds = Counter(
            "conveyor_runner_builds_total",
            "Builds this runner finished, by result (succeeded, failed, canceled, errored...).",
            ["result"],
            registry=registry,
        )
        self.busy = Gauge(
            "conveyor_runner_busy_slots",
            "Builds running on this runner.",
            registry=registry,
        )
        self.capacity = Gauge(
            "conveyor_runner_capacity_slots",
            "Builds this runner may run at once.",
            registry=registry,
        )
        self.launch_seconds = Histogram(
            "conveyor_runner_launch_seconds",
            "Time from an assignment arriving to its job started.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )
        self.log_batches_sent = Counter(
            "conveyor_runner_log_batches_sent_total",
            "Log batches acknowledged by the control plane.",
            registry=registry,
        )
        self.log_batches_retried = Counter(
            "conveyor_runner_log_batches_retried_total",
            "Log batch sends that failed and were retried.",
            registry=registry,
        )
        self.launcher_errors = Counter(
            "conveyor_runner_launcher_errors_total",
            "Sandbox or Nomad errors, by launcher.",
            ["launcher"],
            registry=registry,
        )
        self.nomad_capacity_waits = Gauge(
            "conveyor_runner_nomad_capacity_waiting_builds",
            "Nomad builds queued by Nomad (a blocked evaluation) until it has capacity.",
            registry=registry,
        )
        self.sandbox = Gauge(
            "conveyor_runner_sandbox",
            "The local launcher's sandbox: 1 for the mode builds run in (bubblewrap, or"
            " none: the operator chose --sandbox none), 0 for the other.",
            ["mode"],
            registry=registry,
        )
        self.sandbox_limit_hits = Counter(
            "conveyor_runner_sandbox_limit_hits_total",
            "Local builds that hit a sandbox limit, by limit (memory, processes, cpu, workspace).",
            ["limit"],
            registry=registry,
        )
        self.reconnects = Counter(
            "conveyor_runner_reconnects_total",
            "Times the runner reconnected to the control plane.",
            registry=registry,
        )
        self.cache_restores = Counter(
            "conveyor_runner_cache_restores_total",
            "Build-cache restores, by result (exact, fallback, miss, error).",
            ["result"],
            registry=registry,
        )
        self.cache_saves = Counter(
            "conveyor_runner_cache_saves_total",
            "Build-cache saves, by result (saved, skipped, too_big, error).",
            ["result"],
            registry=registry,
        )
        self.cache_seconds = Histogram(
            "conveyor_runner_cache_seconds",
            "Time a build spent restoring or saving its cache, by operation.",
            ["operation"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.cache_bytes = Counter(
            "conveyor_runner_cache_bytes_total",
            "Archive bytes moved by the build cache, by operation (restore, save).",
            ["operation"],
            registry=registry,
        )
