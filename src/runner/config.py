"""Runner-agent settings: a frozen tree built from an environment mapping."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.settings import ConfigError, choice, integer, listed, number
from runner.cache import BuildCache, CachePolicy, LocalDirCache, S3Cache
from runner.control_client import split_addresses
from runner.launchers.base import Limits

CACHE_BACKENDS = ("dir", "s3", "off")
SANDBOXES = ("bubblewrap", "none")
BUILD_NETWORKS = ("own", "host")


@dataclass(frozen=True)
class RunnerSettings:
    # HOST:PORT of the control plane, or several separated by commas (its
    # replicas: the runner moves to another when the one in use goes away).
    control_addr: str
    token: str
    # A file listing the addresses, read again whenever the replica in use
    # stops answering (a template kept current by Nomad or Consul).
    control_addr_file: Path | None = None
    name: str = field(default_factory=socket.gethostname)
    capacity: int = 6
    labels: tuple[str, ...] = ()
    launcher: str = "local"
    work_dir: Path = Path("/var/lib/conveyor/runner")
    metrics_addr: str = ""
    tls_ca: str = ""
    limits: Limits = field(default_factory=Limits)
    # How long SIGTERM waits for running builds before handing them back.
    drain_seconds: float = 600.0
    # Local builds: "bubblewrap" (required: the runner refuses to start
    # without a working one) or "none" (plain subprocesses, on purpose).
    sandbox: str = "bubblewrap"
    # Builds with network: "own" (a namespace of their own through
    # slirp4netns where installed) or "host" (the host's, loopback included).
    build_network: str = "own"
    # The build cache: "dir" (``cache_dir``, default ``work_dir/cache``),
    # "s3" (CONVEYOR_CACHE_S3_* and the usual AWS variables) or "off".
    cache: str = "dir"
    cache_dir: Path | None = None
    cache_policy: CachePolicy = field(default_factory=CachePolicy)

    @property
    def cache_root(self) -> Path:
        return self.cache_dir or self.work_dir / "cache"

    @property
    def cache_staging(self) -> Path:
        """Where archives a build sends wait for their upload."""
        return self.work_dir / "cache-staging"

    def open_cache(self, env: Mapping[str, str]) -> BuildCache | None:
        """The build cache these settings name, or None when it is off.
        Raises ``ConfigError`` naming a missing S3 setting."""
        if self.cache == "off":
            return None
        if self.cache == "s3":
            if not env.get("CONVEYOR_CACHE_S3_BUCKET"):
                raise ConfigError("CONVEYOR_CACHE_S3_BUCKET", "is required with CONVEYOR_CACHE=s3")
            return BuildCache(S3Cache.from_env(env), self.cache_policy)
        self.cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = LocalDirCache(self.cache_root)
        store.sweep_partials()
        return BuildCache(store, self.cache_policy)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> RunnerSettings:
        """Build settings from ``CONVEYOR_*`` variables, then ``overrides``
        (command-line flags). Raises ``ConfigError`` naming a bad variable
        (or the flag that overrides it)."""
        values: dict[str, object] = {
            "control_addr": env.get("CONVEYOR_CONTROL_ADDR", ""),
            "token": env.get("CONVEYOR_RUNNER_TOKEN", ""),
            "launcher": env.get("CONVEYOR_LAUNCHER", "local"),
            "tls_ca": env.get("CONVEYOR_TLS_CA", ""),
            "metrics_addr": env.get("CONVEYOR_RUNNER_METRICS_ADDR", ""),
        }
        if env.get("CONVEYOR_RUNNER_CAPACITY"):
            values["capacity"] = integer(env, "CONVEYOR_RUNNER_CAPACITY", 0)
        if env.get("CONVEYOR_CONTROL_ADDR_FILE"):
            values["control_addr_file"] = Path(env["CONVEYOR_CONTROL_ADDR_FILE"])
        if env.get("CONVEYOR_WORK_DIR"):
            values["work_dir"] = Path(env["CONVEYOR_WORK_DIR"])
        values.update(_cache_values(env))
        values["build_network"] = choice(env, "CONVEYOR_BUILD_NETWORK", "own", BUILD_NETWORKS)
        values["sandbox"] = choice(env, "CONVEYOR_SANDBOX", "bubblewrap", SANDBOXES)
        if env.get("CONVEYOR_RUNNER_LABELS"):
            values["labels"] = listed(env, "CONVEYOR_RUNNER_LABELS")
        values.update({k: v for k, v in overrides.items() if v not in (None, "", ())})
        settings = cls(**values)  # type: ignore[arg-type]
        try:
            addresses = split_addresses(settings.control_addr)
        except ValueError as exc:
            raise ConfigError("CONVEYOR_CONTROL_ADDR (--control)", str(exc)) from None
        if settings.control_addr_file is not None:
            try:
                text = settings.control_addr_file.read_text(encoding="utf-8")
                addresses += split_addresses(text.replace("\n", ","))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ConfigError(
                    f"CONVEYOR_CONTROL_ADDR_FILE ({settings.control_addr_file})", str(exc)
                ) from None
        if not addresses:
            raise ConfigError(
                "CONVEYOR_CONTROL_ADDR",
                "the control-plane address is required"
                " (--control, CONVEYOR_CONTROL_ADDR or CONVEYOR_CONTROL_ADDR_FILE)",
            )
        if not settings.token:
            raise ConfigError(
                "CONVEYOR_RUNNER_TOKEN", "a runner token is required (--token or this variable)"
            )
        if not 0 < settings.capacity <= 1000:
            raise ConfigError(
                "CONVEYOR_RUNNER_CAPACITY", "capacity must be between 1 and 1000 (--capacity)"
            )
        return settings


def _cache_values(env: Mapping[str, str]) -> dict[str, object]:
    """CONVEYOR_CACHE, CONVEYOR_CACHE_DIR and the limits in
    CONVEYOR_CACHE_MAX_ENTRY_MB, CONVEYOR_CACHE_MAX_PROJECT_MB,
    CONVEYOR_CACHE_MAX_TOTAL_MB and CONVEYOR_CACHE_MAX_AGE_DAYS. Raises
    ``ConfigError`` naming a bad one."""
    values: dict[str, object] = {}
    values["cache"] = choice(env, "CONVEYOR_CACHE", "dir", CACHE_BACKENDS)
    if env.get("CONVEYOR_CACHE_DIR"):
        values["cache_dir"] = Path(env["CONVEYOR_CACHE_DIR"])
    defaults = CachePolicy()
    limits: dict[str, float] = {}
    for name, attr, scale in (
        ("CONVEYOR_CACHE_MAX_ENTRY_MB", "max_entry_bytes", 1024 * 1024),
        ("CONVEYOR_CACHE_MAX_PROJECT_MB", "max_project_bytes", 1024 * 1024),
        ("CONVEYOR_CACHE_MAX_TOTAL_MB", "max_total_bytes", 1024 * 1024),
        ("CONVEYOR_CACHE_MAX_AGE_DAYS", "max_age_days", 1),
    ):
        if not env.get(name):
            continue
        value = number(env, name, 0.0)
        if value <= 0:
            raise ConfigError(name, f"must be positive, not {value:g}")
        limits[attr] = value * scale
    values["cache_policy"] = CachePolicy(
        max_entry_bytes=int(limits.get("max_entry_bytes", defaults.max_entry_bytes)),
        max_project_bytes=int(limits.get("max_project_bytes", defaults.max_project_bytes)),
        max_total_bytes=int(limits.get("max_total_bytes", defaults.max_total_bytes)),
        max_age_days=limits.get("max_age_days", defaults.max_age_days),
    )
    return values
