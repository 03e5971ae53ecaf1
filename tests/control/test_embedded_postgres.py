"""The embedded PostgreSQL: TCP on 127.0.0.1 with a password (builds with
network share the host's loopback), resumable, upgrading trust-only dirs."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from control.storage.embedded import EmbeddedPostgres


def test_tcp_needs_the_password_and_a_restart_keeps_the_data(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    url = server.start()
    try:
        assert server.password_file.stat().st_mode & 0o077 == 0
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{server.port}/postgres").close()
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres:wrong@127.0.0.1:{server.port}/postgres").close()
    finally:
        server.stop()
    again = EmbeddedPostgres(tmp_path / "pg")
    url = again.start()
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT x FROM kept").fetchone()
        assert row == (42,)
    finally:
        again.stop()


def test_a_directory_made_with_trust_auth_is_upgraded(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    server.start()
    server.stop()
    hba = server.data_dir / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    server.password_file.unlink()
    again = EmbeddedPostgres(tmp_path / "pg")
    url = again.start()
    try:
        assert "trust" not in hba.read_text().split("host", 1)[1]
        with psycopg.connect(url) as conn:
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{again.port}/postgres").close()
    finally:
        again.stop()
