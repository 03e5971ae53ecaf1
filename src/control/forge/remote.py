"""Reading a branch head with ``git ls-remote`` on the control plane's host.

A manual trigger without a commit and every deploy-hook call read the head
of a branch here, on a URL a tenant chose, so each read is fenced the way a
build is (see "Threat model" in docs/operations.md):

- it runs as ``nobody`` when the control plane is root (as the control
  plane's own user otherwise), without any user's git or SSH configuration,
  identities or agent, so it reads only what any user of the host may read:
  never a root-only repository, never with root's keys;
- a network URL's host is resolved here and refused when any of its
  addresses is loopback, link-local, unspecified, multicast or one of this
  host's own (a build's network cannot reach those either); git then
  connects to the address that was checked (pinned), so DNS cannot answer
  differently between the check and the connection, and HTTP redirects are
  not followed;
- a local path is read only when the operator allows local repositories,
  by the same unprivileged user, so it reads what a root runner's build
  user could (every folder above the path must let other users pass);
- every read ends within ``RepositorySettings.timeout`` seconds, waiting
  for a slot included (its process group is killed), and at most
  ``concurrency`` run at once, ``per_account`` for one account, so a silent
  listener holds a bounded number of processes for a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlparse, urlunparse

import psutil

from control.config import RepositorySettings
from control.domain import project as proj
from control.errors import FailedPrecondition, InvalidArgument, Unavailable
from control.metrics import ForgeMetrics

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What a build's network cannot reach, so neither may the control plane on
# a tenant's behalf: this host (loopback), cloud metadata and other
# link-local services, and addresses that are no host at all.
BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fe80::/10",
        "ff00::/8",
    )
)
DEFAULT_PORTS = {"https": 443, "http": 80, "git": 9418, "ssh": 22}
SCP_RE = re.compile(r"(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/].*)")
UNPRIVILEGED_USER = "nobody"
PATH = "/usr/bin:/bin:/usr/local/bin"
# Read by every git process of a read (ls-remote and the upload-pack it
# starts for a local path): the repository may belong to another uid, as a
# build's clone allows too. Only a global config file is trusted for this.
GIT_CONFIG = b"[safe]\n\tdirectory = *\n"
STDERR_CHARS = 300


@dataclass(frozen=True)
class Target:
    """Where a network URL connects: its scheme, host and port."""

    scheme: str
    host: str
    port: int


def network_target(url: str) -> Target | None:
    """The host a network repository URL connects to, or None for a local
    path. ``url`` must have passed ``validate_repo_url``."""
    if proj.local_repository_path(url) is not None:
        return None
    scp = SCP_RE.fullmatch(url)
    if scp is not None and "://" not in url:
        return Target("ssh", scp["host"], 22)
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:
        raise InvalidArgument("repo_url", "the port is not a number from 0 to 65535") from None
    if not parsed.hostname:
        raise InvalidArgument("repo_url", "must name a host")
    return Target(parsed.scheme, parsed.hostname, port or DEFAULT_PORTS[parsed.scheme])


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """The addresses of ``host`` (DNS, /etc/hosts); raises
    ``InvalidArgument`` naming ``repo_url`` when it has none."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidArgument("repo_url", f"cannot resolve {host}: {exc.strerror}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def host_addresses() -> set[IPAddress]:
    """Every address of this host's interfaces."""
    found: set[IPAddress] = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):
                    found.add(ipaddress.ip_address(address.address.split("%")[0]))
    return found


def redact(text: str, url: str) -> str:
    """``text`` without the password or token of ``url``'s user part."""
    parsed = urlparse(url)
    if parsed.password:
        text = text.replace(parsed.password, "***")
    return text


@dataclass
class _Slots:
    """At most ``total`` reads at once, ``per_account`` for one account."""

    total: int
    per_account: int
    running: asyncio.Semaphore = field(init=False)
    accounts: dict[str, tuple[asyncio.Semaphore, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.running = asyncio.Semaphore(self.total)

    @contextlib.asynccontextmanager
    async def hold(self, account_id: str) -> AsyncIterator[None]:
        sem, users = self.accounts.get(account_id, (asyncio.Semaphore(self.per_account), 0))
        self.accounts[account_id] = (sem, users + 1)
        try:
            # The account's own slot first: one account's queue never holds
            # a slot of the whole control plane while it waits.
            async with sem, self.running:
                yield
        finally:
            sem, users = self.accounts[account_id]
            if users == 1:
                del self.accounts[account_id]
            else:
                self.accounts[account_id] = (sem, users - 1)


class RemoteReader:
    """Reads branch heads for the control plane (see the module docstring).

    ``blocked`` and ``own_addresses`` are the URL policy; the defaults are
    what a build's network cannot reach; ``resolve`` maps a host and port
    to addresses (``resolve_host``: the system's resolver). Create it inside
    the running event loop."""

    def __init__(
        self,
        settings: RepositorySettings,
        metrics: ForgeMetrics | None = None,
        *,
        blocked: Iterable[IPNetwork] = BLOCKED_NETWORKS,
        own_addresses: Callable[[], set[IPAddress]] = host_addresses,
        resolve: Callable[[str, int], Awaitable[list[IPAddress]]] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.blocked = tuple(blocked)
        self.own_addresses = own_addresses
        self.resolve = resolve or resolve_host
        self._slots = _Slots(settings.concurrency, settings.per_account)
        self._user: tuple[int, int] | None = None
        self._setpriv = shutil.which("setpriv")
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(UNPRIVILEGED_USER)
                self._user = (entry.pw_uid, entry.pw_gid)
            except KeyError:
                self._user = (65534, 65534)

    @property
    def reads_as(self) -> str:
        """Who reads: "nobody (uid N)" or "the control plane's user"."""
        if self._user is None:
            return "the control plane's user"
        return f"{UNPRIVILEGED_USER} (uid {self._user[0]})"

    async def branch_head(self, account_id: str, repo_url: str, branch: str) -> str:
        """The commit at the tip of ``branch``.

        Raises ``InvalidArgument`` naming ``repo_url`` (refused by the URL
        policy, unreadable, no answer within the timeout) or ``branch`` (no
        such branch), and ``Unavailable`` when no read slot came free within
        the timeout (too many reads at once: retry later)."""
        started = time.monotonic()
        try:
            sha = await self._read(account_id, repo_url, f"refs/heads/{branch}")
        except InvalidArgument as exc:
            self._count("no_branch" if exc.field == "branch" else "refused", started)
            log.warning("git ls-remote of account %s: %s", account_id, exc)
            raise
        except Unavailable:
            self._count("busy", started)
            log.warning("git ls-remote of account %s: no read slot within the timeout", account_id)
            raise
        if sha is None:
            self._count("no_branch", started)
            raise InvalidArgument("branch", f"branch {branch!r} does not exist in the repository")
        self._count("ok", started)
        return sha

    async def check_local(self, account_id: str, repo_url: str) -> None:
        """For a local path this host can see, raise ``InvalidArgument``
        naming ``repo_url`` unless an unprivileged user can read it as a
        git repository (what a root runner's build user gets); also when
        local repositories are not allowed. A path that does not exist here
        may be on a runner's host: nothing more is checked."""
        proj.validate_repo_allowed(repo_url, self.settings.local_allowed)
        if proj.local_repository_path(repo_url) is None:
            return
        try:
            await self._read(account_id, repo_url, "HEAD", must_exist=False)
        except Unavailable:
            # Too busy to check now; the build itself will say.
            log.warning("could not check a local repository of account %s: no slot", account_id)

    def _count(self, result: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.ls_remote.labels(result).inc()
            self.metrics.ls_remote_seconds.observe(time.monotonic() - started)

    async def _read(
        self, account_id: str, repo_url: str, ref: str, *, must_exist: bool = True
    ) -> str | None:
        """The commit ``ref`` names, or None when the repository has no such
        ref (or, with ``must_exist`` false, the local path is not here)."""
        timeout = self.settings.timeout
        phase = "resolve"
        try:
            async with asyncio.timeout(timeout):
                argv, fds = await self._command(repo_url, must_exist)
                if not argv:
                    return None
                try:
                    phase = "wait"
                    async with self._slots.hold(account_id):
                        phase = "run"
                        out = await self._run(repo_url, [*argv, ref], fds)
                finally:
                    for fd in fds:
                        os.close(fd)
        except TimeoutError:
            if phase == "wait":
                raise Unavailable(
                    f"too many repository reads at once: none started within {timeout:g} s;"
                    " try again, or give commit_sha"
                ) from None
            what = "could not be resolved" if phase == "resolve" else "did not answer"
            raise InvalidArgument(
                "repo_url", f"the repository {what} within {timeout:g} s"
            ) from None
        for line in out.splitlines():
            sha, _, name = line.partition("\t")
            if name == ref:
                return sha
        return None

    async def _command(self, repo_url: str, must_exist: bool) -> tuple[list[str], list[int]]:
        """The git command line reading ``repo_url`` (without the ref) and
        the descriptor of its config, which it must inherit; ([], []) when
        a local path is not on this host and ``must_exist`` is false. Raises
        ``InvalidArgument`` for a refused URL."""
        proj.validate_repo_allowed(repo_url, self.settings.local_allowed)
        path = proj.local_repository_path(repo_url)
        if path is not None and not self._local_exists(path, must_exist):
            return [], []
        argv = [
            "git",
            # Only the one protocol of this URL: no ext::, no fd::, no
            # submodule or redirect to another transport.
            "-c", "protocol.allow=never",
            "-c", "http.followRedirects=false",
        ]  # fmt: skip
        if path is not None:
            # The path as written, read by the unprivileged user: as a root
            # runner's build user reaches it (bubblewrap binds it as that
            # user), so every folder above it must let other users pass.
            argv += ["-c", "protocol.file.allow=always", "ls-remote", "--", path]
        else:
            argv += await self._network_args(repo_url)
        config = os.memfd_create("conveyor-gitconfig", os.MFD_CLOEXEC)
        os.write(config, GIT_CONFIG)
        return argv, [config]

    def _local_exists(self, path: str, must_exist: bool) -> bool:
        """Whether ``path`` is on this host (asked with the control plane's
        own rights); raises ``InvalidArgument`` when it must be and is not."""
        try:
            os.stat(path)
        except FileNotFoundError:
            if not must_exist:
                return False
            raise InvalidArgument(
                "repo_url",
                f"{path} does not exist on the control plane's host, so its head cannot be"
                " read here: give commit_sha",
            ) from None
        except PermissionError:
            # Not even this process may look: then no build may either.
            return True
        return True

    def _unreadable(self, path: str, why: str) -> InvalidArgument:
        return InvalidArgument(
            "repo_url",
            f"builds cannot read {path} as a git repository ({why}): make it readable to"
            f" other users (chmod -R o+rX {path}, and o+x on every folder above it;"
            f" {self.reads_as} could not read it), or serve it over https, ssh or git",
        )

    async def _network_args(self, repo_url: str) -> list[str]:
        target = network_target(repo_url)
        assert target is not None
        address = await self._allowed_address(target)
        literal = f"[{address}]" if address.version == 6 else str(address)
        args = ["-c", f"protocol.{target.scheme}.allow=always"]
        url = repo_url
        if target.scheme in ("http", "https"):
            args += ["-c", f"http.curloptResolve={target.host}:{target.port}:{literal}"]
        elif target.scheme == "git":
            parsed = urlparse(repo_url)
            netloc = literal if parsed.port is None else f"{literal}:{parsed.port}"
            url = urlunparse(parsed._replace(netloc=netloc))
        else:
            args += ["-c", f"core.sshCommand={self._ssh_command(address)}"]
        return [*args, "ls-remote", "--", url]

    def _ssh_command(self, address: IPAddress) -> str:
        # No identity and no agent: a tenant's URL must not borrow the
        # control plane's SSH keys.
        return (
            "ssh -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityFile=none"
            f" -o ConnectTimeout={int(self.settings.timeout) + 1} -o HostName={address}"
        )

    async def _allowed_address(self, target: Target) -> IPAddress:
        """The first address of ``target.host``, once every address passed
        the URL policy; raises ``InvalidArgument`` naming ``repo_url``."""
        addresses = await self.resolve(target.host, target.port)
        if not addresses:
            raise InvalidArgument("repo_url", f"cannot resolve {target.host}")
        own = self.own_addresses()
        for address in addresses:
            plain = address
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                plain = address.ipv4_mapped
            if plain in own or any(plain in net for net in self.blocked):
                named = str(plain) if target.host == str(plain) else f"{target.host} ({plain})"
                raise InvalidArgument(
                    "repo_url",
                    f"{named} is an address builds cannot reach (loopback, link-local or this"
                    " host), so the control plane does not connect to it either: name a"
                    " repository server on the network",
                )
        return addresses[0]

    async def _run(self, repo_url: str, argv: list[str], fds: list[int]) -> str:
        """Run ``argv`` as the reader's user and return its stdout; raises
        ``InvalidArgument`` naming ``repo_url`` when git fails. Kills the
        process group when cancelled (the timeout included)."""
        env = {
            "PATH": PATH,
            "HOME": "/nonexistent",
            "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
            "GIT_CONFIG_NOSYSTEM": "1",
            # The config descriptor stands for the global file, the only
            # one (besides the system's) where safe.directory counts.
            "GIT_CONFIG_GLOBAL": f"/proc/self/fd/{fds[0]}",
        }
        if self._user is not None:
            # setpriv rather than Popen(user=...): a child that changes its
            # uid between fork and exec in this threaded process can crash
            # before exec (seen as SIGSEGV with gRPC's threads running).
            uid, gid = self._user
            if self._setpriv is None:
                raise FailedPrecondition(
                    "the control plane runs as root without setpriv (util-linux), so it reads"
                    " no repository: install util-linux, or give commit_sha"
                )
            argv = [
                self._setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                "--inh-caps=-all", "--", *argv,
            ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd="/",
            pass_fds=fds,
            start_new_session=True,
        )
        if self.metrics is not None:
            self.metrics.ls_remote_running.inc()
        try:
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                # Reap it even when cancelled: SIGKILL ends it at once.
                await asyncio.shield(proc.wait())
            if self.metrics is not None:
                self.metrics.ls_remote_running.dec()
        if proc.returncode != 0:
            text = redact(err.decode(errors="replace"), repo_url).strip()
            path = proj.local_repository_path(repo_url)
            if path is not None:
                raise self._unreadable(path, _first_fatal(text, proc.returncode))
            raise InvalidArgument("repo_url", f"cannot read the repository: {text[-STDERR_CHARS:]}")
        return out.decode(errors="replace")


def _first_fatal(text: str, returncode: int | None) -> str:
    """git's first ``fatal:`` line, or the end of what it wrote, or its
    exit status."""
    for line in text.splitlines():
        if line.startswith("fatal:"):
            return line.removeprefix("fatal:").strip()
    return text[-STDERR_CHARS:] or f"git exited with {returncode}"
