"""Control-plane settings: a frozen tree built from an environment mapping."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlparse

from common.settings import ConfigError, choice, integer, listed, number, size
from control.secrets import keys_from_env

LOG_FORMATS = ("json", "text")


def _forge_api_urls(env: Mapping[str, str]) -> tuple[str, ...]:
    """``CONVEYOR_FORGE_API_URLS``: the API bases of self-hosted forges
    (comma-separated) that projects may name; the forge token is sent
    there."""
    urls = tuple(u.rstrip("/") for u in listed(env, "CONVEYOR_FORGE_API_URLS"))
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme not in ("https", "http") or not parsed.netloc or " " in url:
            raise ConfigError(
                "CONVEYOR_FORGE_API_URLS", f"{url!r} is not an http(s) URL such as"
                " https://git.example.com/api/v4",
            )  # fmt: skip
    return urls


@dataclass(frozen=True)
class LifecycleSettings:
    """Deadlines of the build lifecycle, in seconds."""

    startup_deadline: float = 60.0
    max_run_timeout: int = 6 * 3600
    kill_grace: int = 10
    # Extra time a runner gets to confirm a stop before the build is closed
    # without it.
    stop_confirm: float = 5.0
    heartbeat_interval: float = 5.0
    runner_lost_after: float = 30.0
    alarm_poll: float = 1.0


@dataclass(frozen=True)
class RetentionSettings:
    """What ``control.retention`` deletes and how fast. Days of 0 keep
    forever. Builds (with their steps and logs) and skipped pushes go
    ``build_days`` after they ended, except the newest ``keep_per_branch``
    builds of each project's branch; webhook deliveries (de-duplication of
    forge redeliveries) after ``delivery_days``; the audit log after
    ``audit_days``."""

    build_days: int = 90
    keep_per_branch: int = 20
    delivery_days: int = 14
    audit_days: int = 400
    interval: float = 3600.0
    # Per statement: builds looked at, log chunks or other rows deleted.
    builds_per_batch: int = 500
    rows_per_batch: int = 5000
    # Between two batches, so that collection never crowds out ingest (s).
    pause: float = 0.05


_RETENTION_VARS = (
    ("build_days", "CONVEYOR_RETENTION_DAYS", 90),
    ("keep_per_branch", "CONVEYOR_RETENTION_KEEP_PER_BRANCH", 20),
    ("delivery_days", "CONVEYOR_DELIVERY_RETENTION_DAYS", 14),
    ("audit_days", "CONVEYOR_AUDIT_RETENTION_DAYS", 400),
)


def _retention(env: Mapping[str, str]) -> RetentionSettings:
    values: dict[str, int] = {}
    for key, name, default in _RETENTION_VARS:
        values[key] = integer(env, name, default)
        if values[key] < 0:
            raise ConfigError(name, f"must be 0 or more, not {values[key]}")
    interval = number(env, "CONVEYOR_RETENTION_INTERVAL_SECONDS", 3600.0)
    if interval <= 0:
        raise ConfigError("CONVEYOR_RETENTION_INTERVAL_SECONDS", "must be more than 0")
    return RetentionSettings(
        build_days=values["build_days"],
        keep_per_branch=values["keep_per_branch"],
        delivery_days=values["delivery_days"],
        audit_days=values["audit_days"],
        interval=interval,
    )


LOCAL_REPOSITORY_MODES = ("allow", "deny")


@dataclass(frozen=True)
class RepositorySettings:
    """Which repositories projects may name, and how the control plane reads
    a branch head (manual triggers, deploy hooks) with ``git ls-remote``.

    ``local`` is ``allow`` (absolute paths and ``file://`` URLs: one user,
    the default of ``conveyor up``) or ``deny`` (every account names a
    network URL: the default of ``conveyor control serve``). A read takes at
    most ``timeout`` seconds, waiting for a slot included; at most
    ``concurrency`` run at once, ``per_account`` of them for one account."""

    local: str = "deny"
    timeout: float = 10.0
    concurrency: int = 8
    per_account: int = 2

    @property
    def local_allowed(self) -> bool:
        return self.local == "allow"


def _repositories(env: Mapping[str, str]) -> RepositorySettings:
    local = choice(env, "CONVEYOR_LOCAL_REPOSITORIES", "deny", LOCAL_REPOSITORY_MODES)
    timeout = number(env, "CONVEYOR_LS_REMOTE_TIMEOUT_SECONDS", 10.0)
    if not 0 < timeout <= 300:
        raise ConfigError("CONVEYOR_LS_REMOTE_TIMEOUT_SECONDS", "must be between 0 and 300")
    concurrency = integer(env, "CONVEYOR_LS_REMOTE_CONCURRENCY", 8)
    per_account = integer(env, "CONVEYOR_LS_REMOTE_PER_ACCOUNT", 2)
    for name, value in (
        ("CONVEYOR_LS_REMOTE_CONCURRENCY", concurrency),
        ("CONVEYOR_LS_REMOTE_PER_ACCOUNT", per_account),
    ):
        if value < 1:
            raise ConfigError(name, f"must be 1 or more, not {value}")
    return RepositorySettings(
        local=local, timeout=timeout, concurrency=concurrency, per_account=per_account
    )


@dataclass(frozen=True)
class DiskSettings:
    """When log batches are refused (``control.logs.admission``).

    The database's free space is measured on ``path`` (a directory on the
    database's filesystem: ``conveyor up`` sets its data directory) with
    statvfs, and/or as ``budget_bytes`` minus ``pg_database_size`` (an
    external server whose disk this process cannot see). Below
    ``min_free_bytes`` new log batches are refused until space returns.
    Neither set: the watermark is off. ``account_log_quota_bytes`` bounds
    the log bytes one account keeps stored (0: no quota)."""

    path: str = ""
    budget_bytes: int = 0
    min_free_bytes: int = 1024**3
    interval: float = 2.0
    account_log_quota_bytes: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DiskSettings:
        """Raises ``ConfigError`` naming a malformed variable."""
        interval = number(env, "CONVEYOR_DISK_CHECK_SECONDS", 2.0)
        if not 0 < interval <= 300:
            raise ConfigError("CONVEYOR_DISK_CHECK_SECONDS", "must be more than 0 and at most 300")
        return cls(
            path=env.get("CONVEYOR_DISK_PATH", ""),
            budget_bytes=size(env, "CONVEYOR_DATABASE_DISK_BUDGET", 0),
            min_free_bytes=size(env, "CONVEYOR_DISK_MIN_FREE", 1024**3),
            interval=interval,
            account_log_quota_bytes=size(env, "CONVEYOR_ACCOUNT_LOG_QUOTA", 0),
        )


@dataclass(frozen=True)
class Settings:
    database_url: str = ""
    grpc_addr: str = "127.0.0.1:7070"
    http_addr: str = "127.0.0.1:8080"
    public_url: str = ""
    admin_token: str = ""
    runner_token: str = ""
    default_account: str = "default"
    default_concurrency: int = 6
    global_capacity: int = 0  # 0: the runners' slots are the only bound
    scheduler_tick: float = 1.0
    tls_cert: str = ""
    tls_key: str = ""
    log_format: str = "json"
    webhook_max_bytes: int = 5 * 1024 * 1024
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    # AES-GCM keys for secrets at rest, current first (see control.secrets).
    secret_keys: tuple[bytes, ...] = ()
    tls_ca: str = ""
    # Forge API bases besides the public ones that projects may name.
    forge_api_urls: tuple[str, ...] = ()
    # Data retention (issue 16): see RetentionSettings.
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    # Disk watermark and account log quota (issues 15 and 16): DiskSettings.
    disk: DiskSettings = field(default_factory=DiskSettings)
    # Local-path repositories and the control plane's ls-remote (issue 15).
    repositories: RepositorySettings = field(default_factory=RepositorySettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from ``CONVEYOR_*`` variables; raises
        ``ConfigError`` naming a malformed variable."""
        lifecycle = LifecycleSettings(
            startup_deadline=number(env, "CONVEYOR_STARTUP_DEADLINE_SECONDS", 60.0),
            max_run_timeout=integer(env, "CONVEYOR_MAX_RUN_TIMEOUT_SECONDS", 6 * 3600),
            kill_grace=integer(env, "CONVEYOR_KILL_GRACE_SECONDS", 10),
            runner_lost_after=number(env, "CONVEYOR_RUNNER_LOST_SECONDS", 30.0),
            heartbeat_interval=number(env, "CONVEYOR_HEARTBEAT_SECONDS", 5.0),
        )
        return cls(
            database_url=env.get("CONVEYOR_DATABASE_URL", ""),
            grpc_addr=env.get("CONVEYOR_GRPC_ADDR", cls.grpc_addr),
            http_addr=env.get("CONVEYOR_HTTP_ADDR", cls.http_addr),
            public_url=env.get("CONVEYOR_PUBLIC_URL", ""),
            admin_token=env.get("CONVEYOR_ADMIN_TOKEN", ""),
            runner_token=env.get("CONVEYOR_RUNNER_TOKEN", ""),
            default_concurrency=integer(env, "CONVEYOR_DEFAULT_CONCURRENCY", 6),
            global_capacity=integer(env, "CONVEYOR_GLOBAL_CAPACITY", 0),
            tls_cert=env.get("CONVEYOR_TLS_CERT", ""),
            tls_key=env.get("CONVEYOR_TLS_KEY", ""),
            tls_ca=env.get("CONVEYOR_TLS_CA", ""),
            secret_keys=keys_from_env(env),
            log_format=choice(env, "CONVEYOR_LOG_FORMAT", "json", LOG_FORMATS),
            lifecycle=lifecycle,
            forge_api_urls=_forge_api_urls(env),
            retention=_retention(env),
            disk=DiskSettings.from_env(env),
            repositories=_repositories(env),
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
