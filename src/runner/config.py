"""Runner-agent settings: a frozen tree built from an environment mapping."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runner.launchers.base import Limits


@dataclass(frozen=True)
class RunnerSettings:
    control_addr: str
    token: str
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
    require_sandbox: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> RunnerSettings:
        """Build settings from ``CONVEYOR_*`` variables, then ``overrides``
        (command-line flags). Raises ``ValueError`` naming a bad variable."""
        values: dict[str, object] = {
            "control_addr": env.get("CONVEYOR_CONTROL_ADDR", ""),
            "token": env.get("CONVEYOR_RUNNER_TOKEN", ""),
            "launcher": env.get("CONVEYOR_LAUNCHER", "local"),
            "tls_ca": env.get("CONVEYOR_TLS_CA", ""),
            "metrics_addr": env.get("CONVEYOR_RUNNER_METRICS_ADDR", ""),
        }
        if env.get("CONVEYOR_RUNNER_CAPACITY"):
            try:
                values["capacity"] = int(env["CONVEYOR_RUNNER_CAPACITY"])
            except ValueError:
                raise ValueError("CONVEYOR_RUNNER_CAPACITY must be an integer") from None
        if env.get("CONVEYOR_WORK_DIR"):
            values["work_dir"] = Path(env["CONVEYOR_WORK_DIR"])
        if env.get("CONVEYOR_RUNNER_LABELS"):
            values["labels"] = tuple(
                x.strip() for x in env["CONVEYOR_RUNNER_LABELS"].split(",") if x.strip()
            )
        values.update({k: v for k, v in overrides.items() if v not in (None, "", ())})
        settings = cls(**values)  # type: ignore[arg-type]
        if not settings.control_addr:
            raise ValueError("the control-plane address is required (--control)")
        if not settings.token:
            raise ValueError("a runner token is required (--token)")
        if not 0 < settings.capacity <= 1000:
            raise ValueError("capacity must be between 1 and 1000")
        return settings
