"""`conveyor up` refuses what it cannot run on with one sentence and a
non-zero exit code, before it starts anything: a port in use, a data
directory on a read-only filesystem, a data directory of a newer version."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.storage.embedded import server_major_version
from conveyor_cli.up import run_up

pytestmark = pytest.mark.timeout(60)


def refusal(data_dir: Path, *flags: str, database_url: str = "") -> str:
    """Run `up` as a process and return its one line of stderr; fail unless
    it exits 2 at once with exactly one line."""
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_DATABASE_URL"}
    if database_url:
        env["CONVEYOR_DATABASE_URL"] = database_url
    argv = [
        sys.executable, "-m", "conveyor_cli.main", "up", "--data-dir", str(data_dir),
        "--no-demo", *flags,
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"conveyor up did not refuse: {exc.stderr!r}") from None
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


async def refusal_in_process(
    capsys: pytest.CaptureFixture[str], data_dir: Path, grpc_port: int = 0, http_port: int = 0
) -> str:
    """``run_up`` in this process (no interpreter to start): its one line
    of stderr; fail unless it returns 2 at once with exactly one line."""
    code = await asyncio.wait_for(run_up(data_dir, grpc_port, http_port, demo=False), 20)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines
    return lines[0]


# Never reached: the ports are checked before anything starts.
NO_DATABASE = "postgresql://127.0.0.1:9/none"


async def test_a_port_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", NO_DATABASE)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        grpc = refusal(
            tmp_path / "a", "--grpc-port", str(port), "--http-port", "0",
            database_url=NO_DATABASE,
        )  # fmt: skip
        http = await refusal_in_process(capsys, tmp_path / "b", http_port=port)
    assert grpc == (
        f"error: port {port} on 127.0.0.1 (the gRPC port) is already in use;"
        " choose another with --grpc-port"
    )
    assert http.endswith("(the HTTP port) is already in use; choose another with --http-port")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory that exists, on a filesystem mounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=False
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mount / "data").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount / "data"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_data_directory_on_a_read_only_filesystem(
    read_only_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = await refusal_in_process(capsys, read_only_dir)
    assert line == (
        f"error: the data directory {read_only_dir} is on a read-only filesystem; choose another"
    )


async def test_a_data_directory_of_a_newer_conveyor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "conveyor.json").write_text(
        json.dumps({"token": "cvy_x", "runner_token": "cvr_x", "schema": "9999_from_the_future"})
    )
    line = await refusal_in_process(capsys, data)
    assert line.startswith(
        f"error: the data directory {data} was last used by a newer Conveyor"
        " (database schema 9999_from_the_future; this one knows up to "
    ), line


async def test_a_database_of_a_newer_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CONVEYOR_DATABASE_URL", raising=False)
    data = tmp_path / "data"
    (data / "postgres").mkdir(parents=True)
    newer = int(server_major_version()) + 1
    (data / "postgres" / "PG_VERSION").write_text(f"{newer}\n")
    line = await refusal_in_process(capsys, data)
    assert line == (
        f"error: the database in {data / 'postgres'} was made by a newer PostgreSQL ({newer})"
        f" than this Conveyor ships ({server_major_version()}); use a newer Conveyor"
    )
