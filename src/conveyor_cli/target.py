"""Where the CLI sends its calls: a data directory's conveyor.json, or
CONVEYOR_ADDR + CONVEYOR_TOKEN."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

STATE_FILE = "conveyor.json"


class TargetError(Exception):
    """No control plane could be found; the message says what to set."""


@dataclass(frozen=True)
class Target:
    grpc_address: str
    token: str
    http_url: str = ""
    tls_ca: str = ""

    def channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        if self.tls_ca:
            creds = grpc.ssl_channel_credentials(Path(self.tls_ca).read_bytes())
            return grpc.secure_channel(self.grpc_address, creds, options=options)
        return grpc.insecure_channel(self.grpc_address, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


def read_state(data_dir: Path) -> dict[str, str]:
    path = data_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TargetError(
            f"{path} does not exist: is `conveyor up --data-dir {data_dir}` running?"
        ) from None
    except json.JSONDecodeError as exc:
        raise TargetError(f"{path} is not valid JSON: {exc}") from None
    return {k: str(v) for k, v in data.items()}


def resolve(data_dir: str | None, env: Mapping[str, str] = os.environ) -> Target:
    """``--data-dir`` wins, then CONVEYOR_DATA_DIR, then CONVEYOR_ADDR and
    CONVEYOR_TOKEN. Raises ``TargetError`` saying what to set."""
    chosen = data_dir or env.get("CONVEYOR_DATA_DIR")
    if chosen:
        state = read_state(Path(chosen))
        return Target(
            grpc_address=state["grpc_address"],
            token=env.get("CONVEYOR_TOKEN") or state["token"],
            http_url=state.get("http_url", ""),
            tls_ca=state.get("tls_ca", ""),
        )
    addr, token = env.get("CONVEYOR_ADDR"), env.get("CONVEYOR_TOKEN")
    if addr and token:
        return Target(addr, token, env.get("CONVEYOR_HTTP_URL", ""), env.get("CONVEYOR_TLS_CA", ""))
    raise TargetError(
        "no control plane given: pass --data-dir DIR (or set CONVEYOR_DATA_DIR),"
        " or set CONVEYOR_ADDR and CONVEYOR_TOKEN"
    )
