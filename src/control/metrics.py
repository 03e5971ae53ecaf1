"""Every control-plane metric, declared once against a registry passed in.

Tests build ``ControlMetrics(CollectorRegistry())`` and read values back;
production passes the registry that ``/metrics`` serves.

Most metrics count what this process did, so sum them over replicas. The
build gauges (``conveyor_active_builds``, ``conveyor_queue_depth``,
``conveyor_oldest_queued_build_age_seconds``) describe the whole
installation: ``/metrics`` reads them from PostgreSQL at scrape time (see
``BuildCountsCollector``), every replica reports the same values, and they
combine with ``max``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from control.storage.stats import BuildCounts

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
        self.build_counts = BuildCountsCollector()
        registry.register(self.build_counts)
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
        self.http_api_requests = Counter(
            "conveyor_http_api_requests_total",
            "HTTP/JSON API requests, by gRPC method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.http_api_seconds = Histogram(
            "conveyor_http_api_request_seconds",
            "HTTP/JSON API request latency (to the end of the stream for SSE), by method.",
            ["method"],
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.db_pool = PoolCollector()
        registry.register(self.db_pool)
        # Forge integration (issue 8): declared in ForgeMetrics below.
        self.forge = ForgeMetrics(registry)
        # Data retention (issue 16): declared in RetentionMetrics below.
        self.retention = RetentionMetrics(registry)
        # Disk watermark and log quota (issues 15, 16): DiskMetrics below.
        self.disk = DiskMetrics(registry)


class BuildCountsCollector(Collector):
    """The installation-wide build gauges, from the latest ``BuildCounts``.

    Prometheus collects synchronously, so the async ``/metrics`` handler reads
    the counts from the database and calls ``update`` just before it renders
    the registry. Until the first update, and after an update with ``None``
    (the database did not answer), the families are exposed without samples:
    an absent value, never a stale one.
    """

    def __init__(self) -> None:
        self.counts: BuildCounts | None = None

    def update(self, counts: BuildCounts | None) -> None:
        self.counts = counts

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.counts)

    @staticmethod
    def _families(counts: BuildCounts | None) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "conveyor_active_builds", "Builds initializing or running, in the whole installation."
        )
        depth = GaugeMetricFamily(
            "conveyor_queue_depth",
            "Queued builds waiting for a slot, by account (accounts with none are absent).",
            labels=["account_id"],
        )
        oldest = GaugeMetricFamily(
            "conveyor_oldest_queued_build_age_seconds",
            "Age of the oldest queued build waiting for a slot; 0 when none waits.",
        )
        if counts is not None:
            active.add_metric([], counts.active)
            for account_id, waiting in sorted(counts.waiting.items()):
                depth.add_metric([account_id], waiting)
            oldest.add_metric([], counts.oldest_waiting_seconds)
        yield active
        yield depth
        yield oldest


# The pool's figures: (name, help, psycopg-pool stats key[, scale to base units]).
_POOL_GAUGES = (
    ("conveyor_db_pool_connections", "Connections in the database pool.", "pool_size"),
    ("conveyor_db_pool_available_connections", "Idle pooled connections.", "pool_available"),
    ("conveyor_db_pool_max_connections", "The pool's size limit.", "pool_max"),
    ("conveyor_db_pool_waiting_requests", "Requests waiting for a connection.", "requests_waiting"),
)
_POOL_COUNTERS = (
    ("conveyor_db_pool_requests", "Connections handed out by the pool.", "requests_num", 1.0),
    (
        "conveyor_db_pool_request_wait_seconds",
        "Time requests spent waiting for a connection.",
        "requests_wait_ms",
        0.001,
    ),
    (
        "conveyor_db_pool_request_errors",
        "Requests that got no connection (timeout, pool closed).",
        "requests_errors",
        1.0,
    ),
    (
        "conveyor_db_pool_connection_errors",
        "Failed attempts to open a connection to PostgreSQL.",
        "connections_errors",
        1.0,
    ),
    (
        "conveyor_db_pool_connections_lost",
        "Pooled connections found broken and replaced.",
        "connections_lost",
        1.0,
    ),
)


class PoolCollector(Collector):
    """The database pool's figures, read from ``psycopg_pool`` at collect
    time. ``watch(pool_stats)`` with the pool's ``get_stats`` (cumulative
    counters since the pool opened, never popped); until then the families
    have no samples."""

    def __init__(self) -> None:
        self._stats: Callable[[], Mapping[str, int]] | None = None

    def watch(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        return self._families({}, with_samples=False)

    def collect(self) -> Iterator[Metric]:
        if self._stats is None:
            return self._families({}, with_samples=False)
        return self._families(self._stats(), with_samples=True)

    @staticmethod
    def _families(stats: Mapping[str, int], *, with_samples: bool) -> Iterator[Metric]:
        for name, doc, key in _POOL_GAUGES:
            gauge = GaugeMetricFamily(name, doc)
            if with_samples:
                gauge.add_metric([], stats.get(key, 0))
            yield gauge
        for name, doc, key, scale in _POOL_COUNTERS:
            counter = CounterMetricFamily(name, doc)
            if with_samples:
                counter.add_metric([], stats.get(key, 0) * scale)
            yield counter


# --- Forge integration (issue 8): webhook skips, commit statuses, deploy hooks.
class ForgeMetrics:
    """Metrics of the forge integration, under ``ControlMetrics.forge``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes_skipped = Counter(
            "conveyor_pushes_skipped_total",
            "Forge events that queued nothing, by reason (branch_excluded, skip_ci...).",
            ["provider", "reason"],
            registry=registry,
        )
        self.status_reports = Counter(
            "conveyor_forge_status_reports_total",
            "Commit statuses, by forge and result (delivered, retried, failed, rejected,"
            " dropped, skipped).",
            ["forge", "result"],
            registry=registry,
        )
        self.ls_remote = Counter(
            "conveyor_ls_remote_total",
            "Branch-head reads (git ls-remote) of manual triggers and deploy hooks, by result"
            " (ok, no_branch, refused, busy).",
            ["result"],
            registry=registry,
        )
        self.ls_remote_running = Gauge(
            "conveyor_ls_remote_running",
            "git ls-remote processes running now.",
            registry=registry,
        )
        self.ls_remote_seconds = Histogram(
            "conveyor_ls_remote_seconds",
            "Duration of one branch-head read, waiting for a slot included.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.up = Gauge(
            "conveyor_forge_up",
            "1 when the forge answered the last commit-status request, 0 when it did not.",
            ["forge"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "conveyor_forge_request_seconds",
            "Duration of one commit-status request to a forge.",
            ["forge"],
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "conveyor_forge_status_queue_depth",
            "Builds waiting for their commit status to be sent.",
            registry=registry,
        )
        self.deploy_hook_calls = Counter(
            "conveyor_deploy_hook_calls_total",
            "Deploy hook calls, by result (queued, duplicate, not_found, error).",
            ["result"],
            registry=registry,
        )


# --- Data retention (issue 16): the collection loop of control/retention.py.
class RetentionMetrics:
    """Metrics of data retention, under ``ControlMetrics.retention``. Only
    the replica holding the collection lock deletes; the others count a
    ``skipped`` pass."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.passes = Counter(
            "conveyor_retention_passes_total",
            "Retention passes, by result (ok, error, skipped: another replica collects).",
            ["result"],
            registry=registry,
        )
        self.rows_deleted = Counter(
            "conveyor_retention_rows_deleted_total",
            "Rows deleted by retention, by table (a build's steps and alarms go with it).",
            ["table"],
            registry=registry,
        )
        self.bytes_deleted = Counter(
            "conveyor_retention_bytes_deleted_total",
            "Approximate stored bytes of the rows deleted by retention, by table.",
            ["table"],
            registry=registry,
        )
        self.table_bytes = Gauge(
            "conveyor_table_bytes",
            "On-disk size of a table with its indexes and TOAST, read after each"
            " retention pass (installation-wide: take the max over replicas).",
            ["table"],
            registry=registry,
        )
        self.pass_seconds = Histogram(
            "conveyor_retention_pass_seconds",
            "Duration of one retention pass that held the collection lock.",
            buckets=_BUILD_BUCKETS,
            registry=registry,
        )
        self.last_success = Gauge(
            "conveyor_retention_last_success_timestamp_seconds",
            "Unix time at which this process last completed a retention pass.",
            registry=registry,
        )


# --- Disk watermark and account log quota (issues 15, 16): control/logs/admission.py.
class DiskMetrics:
    """Metrics of log admission, under ``ControlMetrics.disk``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.free_bytes = Gauge(
            "conveyor_database_disk_free_bytes",
            "Free space of the database's disk at the last check (statvfs of"
            " CONVEYOR_DISK_PATH, or CONVEYOR_DATABASE_DISK_BUDGET minus the database size).",
            registry=registry,
        )
        self.min_free_bytes = Gauge(
            "conveyor_database_disk_min_free_bytes",
            "The watermark: below this much free space log batches are refused.",
            registry=registry,
        )
        self.low = Gauge(
            "conveyor_database_disk_low",
            "1 while the database's disk is below the watermark and log batches are refused.",
            registry=registry,
        )
        self.checks = Counter(
            "conveyor_database_disk_checks_total",
            "Free-space checks, by result (ok, error).",
            ["result"],
            registry=registry,
        )
        self.batches_refused = Counter(
            "conveyor_log_batches_refused_total",
            "Log batches refused, by reason (disk_low: resent later by the runner;"
            " quota: the account's log quota is used up, the build's log is closed).",
            ["reason"],
            registry=registry,
        )
