"""Every control-plane metric, declared once against a registry passed in.

Tests build ``ControlMetrics(CollectorRegistry())`` and read values back;
production passes the registry that ``/metrics`` serves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Push-to-start latencies are tens of milliseconds; builds run for minutes.
_FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1, 2, 5, 10, 30, 60)
_BUILD_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class ControlMetrics:
    """The control plane's metrics. Names follow Prometheus conventions."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.builds_finished = Counter(
            "conveyor_builds_finished_total",
            "Builds that reached a final state, by that state.",
            ["status"],
            registry=registry,
        )
        self.builds_queued = Counter(
            "conveyor_builds_queued_total",
            "Builds queued, by trigger (push, manual, retry, pull_request, hook).",
            ["trigger"],
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "conveyor_build_queue_seconds",
            "Time from queued to initializing.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.push_to_running_seconds = Histogram(
            "conveyor_push_to_running_seconds",
            "Time from the webhook arriving to the build running.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.build_duration_seconds = Histogram(
            "conveyor_build_duration_seconds",
            "Time from initializing to a final state, by final state.",
            ["status"],
            buckets=_BUILD_BUCKETS,
            registry=registry,
        )
        self.active_builds = Gauge(
            "conveyor_active_builds",
            "Builds initializing or running.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "conveyor_queue_depth",
            "Queued builds, by account.",
            ["account_id"],
            registry=registry,
        )
        self.oldest_queued_seconds = Gauge(
            "conveyor_oldest_queued_build_age_seconds",
            "Age of the oldest queued build.",
            registry=registry,
        )
        self.scheduler_tick_seconds = Histogram(
            "conveyor_scheduler_tick_seconds",
            "Duration of one scheduler pass.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.scheduler_decisions = Counter(
            "conveyor_scheduler_decisions_total",
            "Scheduler decisions, by decision (started, no_runner, account_limit, error).",
            ["decision"],
            registry=registry,
        )
        self.log_lines = Counter(
            "conveyor_log_lines_ingested_total",
            "Log lines stored.",
            registry=registry,
        )
        self.log_bytes = Counter(
            "conveyor_log_bytes_ingested_total",
            "Log bytes stored.",
            registry=registry,
        )
        self.log_batches_duplicate = Counter(
            "conveyor_log_batches_duplicate_total",
            "Log batches received again and acknowledged without storing.",
            registry=registry,
        )
        self.log_streams = Gauge(
            "conveyor_log_streams_active",
            "Open StreamLogs calls.",
            registry=registry,
        )
        self.runners_connected = Gauge(
            "conveyor_runners_connected",
            "Runners with an open stream to this process.",
            registry=registry,
        )
        self.runner_capacity = Gauge(
            "conveyor_runner_capacity_slots",
            "Build slots of the connected runners.",
            registry=registry,
        )
        self.runner_busy = Gauge(
            "conveyor_runner_busy_slots",
            "Busy build slots of the connected runners.",
            registry=registry,
        )
        self.runners_lost = Counter(
            "conveyor_runners_lost_total",
            "Runners declared lost after missing heartbeats.",
            registry=registry,
        )
        self.alarms_fired = Counter(
            "conveyor_alarms_fired_total",
            "Build alarms fired, by kind (startup, run).",
            ["kind"],
            registry=registry,
        )
        self.webhooks = Counter(
            "conveyor_webhooks_total",
            "Webhook deliveries, by provider and result.",
            ["provider", "result"],
            registry=registry,
        )
        self.grpc_requests = Counter(
            "conveyor_grpc_requests_total",
            "gRPC requests, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.grpc_seconds = Histogram(
            "conveyor_grpc_request_seconds",
            "gRPC request latency, by method.",
            ["method"],
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.db_pool_size = Gauge(
            "conveyor_db_pool_connections",
            "Connections in the database pool.",
            registry=registry,
        )
        self.db_pool_available = Gauge(
            "conveyor_db_pool_available_connections",
            "Idle connections in the database pool.",
            registry=registry,
        )
        self.db_pool_waiting = Gauge(
            "conveyor_db_pool_waiting_requests",
            "Requests waiting for a pooled connection.",
            registry=registry,
        )
