"""A build's own network: slirp4netns behind the sandbox's network namespace.

A build with network runs in a network namespace of its own, like one
without, and ``slirp4netns`` (user-mode TCP/IP, as rootless Podman uses)
gives it a tap device with NAT to the outside world. What this buys over
sharing the host's network: the host's services (a Nomad agent's API, a
database, the control plane itself) are out of reach, on its loopback
(``--disable-host-loopback``) and on its own addresses, and so are
link-local addresses, where clouds serve instance credentials (blackhole
routes in the build's namespace, ``_fence``); a build cannot bind ports on
the host either. Other machines stay reachable: firewall what builds must
not reach.
What it costs: a process per build and user-mode packet copying (a few
hundred Mbit/s at the least; plenty for fetching dependencies).

slirp4netns runs outside the sandbox, never as root, whatever the mode
of /dev/net/tun: for a root runner, as the build's uid, with a tun device
node of its own (``runner/scripts/tun-shim.sh``: a private /dev/net holding
a node the build uid owns), so it works alike where the device is 0600 and
where it is open to all (udev's 0666). It joins the user namespace that
owns the sandbox's network namespace to configure the device, then
sandboxes itself (its own mount namespace with /etc and /run read-only, no
capabilities, a seccomp filter): it parses the build's packets.
slirp4netns 1.2 sandboxes itself, when not root, as root of the user
namespace of the process it is pointed at, which must map root:
bubblewrap's namespaces map the build's uid alone and allow no more nested
ones (``--disable-userns``), so the runner points it at an anchor
(``_anchor``), a process in the build's network namespace and in a user
namespace of the build uid's own that maps root to it.
An unprivileged runner can make no such anchor (entering the build's
network namespace from outside takes root): there slirp4netns runs as the
runner's uid with its seccomp filter but not its own sandbox, and needs
/dev/net/tun open to all.
It exits when the runner closes its exit pipe, also when the runner dies.

DNS inside is slirp4netns's forwarder at 10.0.2.3 (``RESOLV_CONF``), which
asks the host's resolvers on the build's behalf.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from importlib import resources

import psutil

from common.tasks import cancel_and_wait
from runner.errors import NetworkError
from runner.pipes import close_fd, data_fd

log = logging.getLogger(__name__)

# The resolver configuration the sandbox gets in place of the host's.
RESOLV_CONF = "nameserver 10.0.2.3\n"
# 65520: the largest MTU slirp4netns takes; fewer packets, much faster.
MTU = 65520
_START_TIMEOUT = 10.0
_NS_GET_USERNS = 0xB701  # ioctl_ns(2)
TUN = "/dev/net/tun"

# As root, in a mount namespace of slirp4netns's own: a /dev/net with a tun
# node the build uid owns, then the rest of the command line.
_TUN_SHIM = resources.files("runner").joinpath("scripts/tun-shim.sh").read_text()
# The anchor, once in its user namespace: say so, then wait for its stdin
# to close (the runner's word, or the runner's death). One command line,
# not a script: nothing in it for shellcheck to read.
_ANCHOR = "printf up; exec cat"


def available() -> str | None:
    """The slirp4netns executable, or None when it is not installed."""
    return shutil.which("slirp4netns")


@dataclass(frozen=True)
class RootTools:
    """What a root runner needs besides slirp4netns: setpriv, unshare and
    nsenter (util-linux) and bash, for the anchor and the tun shim."""

    setpriv: str
    unshare: str
    nsenter: str
    bash: str


@dataclass(frozen=True)
class NetworkTools:
    """What giving builds their own network takes on this host, looked up
    once (``network_tools``). ``root`` is set for a root runner only;
    ``ip`` (iproute2, the fence) only for a root runner that has it."""

    slirp4netns: str
    root: RootTools | None = None
    ip: str | None = None


def network_tools() -> NetworkTools | None:
    """The tools for builds' own networks, or None when this host cannot
    give them one: slirp4netns missing, no /dev/net/tun, or (unprivileged
    runner) a device this runner may not open; a root runner also needs
    setpriv, unshare and nsenter (util-linux) and bash."""
    slirp = available()
    if slirp is None or not os.path.exists(TUN):
        return None
    if os.geteuid() != 0:
        return NetworkTools(slirp) if os.access(TUN, os.R_OK | os.W_OK) else None
    found = [shutil.which(name) for name in ("setpriv", "unshare", "nsenter", "bash")]
    setpriv, unshare, nsenter, bash = found
    if setpriv is None or unshare is None or nsenter is None or bash is None:
        return None
    return NetworkTools(slirp, RootTools(setpriv, unshare, nsenter, bash), fence_tools()[1])


def _owning_userns(net: int) -> int:
    """A descriptor of the user namespace that owns the network namespace
    ``net`` (a descriptor): bubblewrap nests the build in a further user
    namespace (``--disable-userns``), which holds no rights over the
    network one. Raises ``OSError``."""
    return fcntl.ioctl(net, _NS_GET_USERNS)


def _setpriv(setpriv: str, uid: int, gid: int) -> list[str]:
    """The prefix that makes the rest of a command line run as ``uid``
    for good, with no capabilities (as the launcher drops to build uids)."""
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all", "--"]


async def _end_anchor(proc: asyncio.subprocess.Process) -> None:
    """Close the anchor's stdin (it exits then) and reap it. Bounded;
    never raises."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def fence_tools() -> tuple[str | None, str | None]:
    """nsenter (util-linux) and ip (iproute2), which fence a build's
    network, for a root runner; (None, None) when either is missing or the
    runner is not root (a route needs CAP_NET_ADMIN over the namespace, and
    a capability does not survive exec into an unmapped uid)."""
    nsenter, ip = shutil.which("nsenter"), shutil.which("ip")
    return (nsenter, ip) if nsenter and ip and os.geteuid() == 0 else (None, None)


def fenced_prefixes() -> list[str]:
    """What a build's own network must not reach beyond the host's
    loopback (slirp4netns fences that): link-local addresses, where clouds
    serve instance metadata and credentials, and this host's own IPv4
    addresses."""
    prefixes = ["169.254.0.0/16"]
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                prefixes.append(f"{address.address}/32")
    return sorted(set(prefixes))


class SandboxPipes:
    """The pipes between the runner and a sandbox that gets a network of
    its own: bubblewrap's ``--info-fd`` (the sandbox's pid), the sandbox's
    own word once bubblewrap has set it up (its loopback among the rest;
    slirp4netns must not race that), and the resolv.conf bubblewrap copies
    in (``--ro-bind-data``)."""

    def __init__(self) -> None:
        """Raises ``OSError`` (out of descriptors), having closed its own."""
        self.info_read = self.info_write = self.up_read = self.up_write = -1
        self.resolv_read = -1
        try:
            self.info_read, self.info_write = os.pipe()
            self.up_read, self.up_write = os.pipe()
            self.resolv_read = data_fd(RESOLV_CONF.encode())
        except OSError:
            self.close()
            raise

    def child_fds(self) -> tuple[int, ...]:
        return (self.info_write, self.up_write, self.resolv_read)

    def close_child_ends(self) -> None:
        """After the sandbox started: it holds its own copies."""
        for fd in self.child_fds():
            close_fd(fd)
        self.info_write = self.up_write = self.resolv_read = -1

    def close(self) -> None:
        self.close_child_ends()
        close_fd(self.info_read)
        close_fd(self.up_read)
        self.info_read = self.up_read = -1

    def sandbox_pid(self) -> int:
        """Blocking: the sandbox's pid (host view) once it is set up. Raises
        ``NetworkError`` when it ended first."""
        chunks = []
        while chunk := os.read(self.info_read, 4096):
            chunks.append(chunk)
        try:
            pid = int(json.loads(b"".join(chunks))["child-pid"])
        except (ValueError, KeyError, TypeError):
            raise NetworkError("the sandbox ended before its network could be set up") from None
        if os.read(self.up_read, 2) != b"up":
            raise NetworkError("the sandbox ended before its network could be set up")
        return pid


class UserNetwork:
    """One build's slirp4netns. ``start`` it once the sandbox exists and
    before the build runs; ``close`` it when the build has ended."""

    def __init__(
        self, tools: NetworkTools, build_user: tuple[int, int] | None, env: dict[str, str]
    ) -> None:
        """``build_user`` is the build's (uid, gid) for a root runner (whose
        ``tools`` are ``rooted``), None for an unprivileged one."""
        if (build_user is not None) != (tools.root is not None):
            raise ValueError("a build user goes with a root runner's tools, and only then")
        self.tools = tools
        self.build_user = build_user
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self._exit_write = -1
        self._stderr: asyncio.Task[None] | None = None
        self.last_words: collections.deque[str] = collections.deque(maxlen=3)

    async def start(self, pid: int, build_id: str) -> None:
        """Attach a configured tap device to the network namespace of
        ``pid`` and return once it is up. Raises ``NetworkError``."""
        try:
            net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"the sandbox's network namespace is gone ({exc})") from exc
        try:
            try:
                owner = _owning_userns(net)
            except OSError as exc:
                raise NetworkError(f"the sandbox's network namespace is gone ({exc})") from exc
            try:
                await self._start_in(net, pid, owner, build_id)
            finally:
                os.close(owner)
        finally:
            os.close(net)
        try:
            await self._fence(pid, build_id)
        except BaseException:
            await asyncio.shield(self.close())
            raise

    async def _start_in(self, net: int, pid: int, owner: int, build_id: str) -> None:
        """Start slirp4netns for the sandbox ``pid``: for a root runner,
        pointed at an anchor, which ends once slirp4netns is up (it has
        joined the anchor's user namespace by then) or failed."""
        if self.build_user is None or self.tools.root is None:
            await self._start(pid, owner, build_id)
            return
        anchor = await self._anchor(net, self.tools.root, *self.build_user)
        try:
            await self._start(anchor.pid, owner, build_id)
        finally:
            await asyncio.shield(_end_anchor(anchor))

    def _argv(self, target: int, owner: int, ready: int, exit_fd: int) -> list[str]:
        """slirp4netns's command line; for a root runner, behind the tun
        shim and setpriv to the build's uid, and sandboxed in the user
        namespace of the anchor ``target``."""
        tools = self.tools
        slirp = [
            tools.slirp4netns,
            "--configure",
            f"--mtu={MTU}",
            "--disable-host-loopback",
            "--enable-seccomp",
            f"--userns-path=/proc/self/fd/{owner}",
            f"--ready-fd={ready}",
            f"--exit-fd={exit_fd}",
        ]
        if self.build_user is None or tools.root is None:
            return [*slirp, str(target), "tap0"]
        root = tools.root
        uid, gid = self.build_user
        rdev = os.stat(TUN).st_rdev
        return [
            root.unshare, "--mount", "--propagation", "private", "--",
            root.bash, "--noprofile", "--norc", "-c", _TUN_SHIM, "tun-shim",
            str(uid), str(gid), str(os.major(rdev)), str(os.minor(rdev)),
            *_setpriv(root.setpriv, uid, gid),
            *slirp, "--enable-sandbox", str(target), "tap0",
        ]  # fmt: skip

    async def _anchor(
        self, net: int, root: RootTools, uid: int, gid: int
    ) -> asyncio.subprocess.Process:
        """A process in the build's network namespace (``net``, a
        descriptor) and in a new user namespace, of the build's uid, that
        maps root to it; up once it said so. Stop it with ``_end_anchor``.
        Raises ``NetworkError``."""
        # Root enters the network namespace (which takes root in the
        # host's user namespace), then, as the build's uid, makes the user
        # namespace: a child of the host's, so the build uid owns it.
        argv = [
            root.nsenter, f"--net=/proc/self/fd/{net}", "--",
            *_setpriv(root.setpriv, uid, gid),
            root.unshare, "--user", "--map-root-user", "--",
            root.bash, "--noprofile", "--norc", "-c", _ANCHOR,
        ]  # fmt: skip
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=self.env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(net,),
                start_new_session=True,
            )
        except OSError as exc:
            raise NetworkError(f"could not start slirp4netns's anchor: {exc}") from exc
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            said = await asyncio.wait_for(proc.stdout.readexactly(2), _START_TIMEOUT)
        except asyncio.IncompleteReadError as exc:
            said = exc.partial
        except BaseException:
            await asyncio.shield(_end_anchor(proc))
            raise
        if said != b"up":
            await asyncio.shield(_end_anchor(proc))
            why = (await proc.stderr.read(4096)).decode(errors="replace").strip()
            raise NetworkError(
                f"could not prepare slirp4netns's user namespace: {why or 'the anchor failed'}"
            )
        return proc

    async def _start(self, target: int, owner: int, build_id: str) -> None:
        """Start slirp4netns for the network namespace of ``target`` (the
        sandbox or its anchor), the user namespace ``owner`` (a descriptor)
        owning it, and wait until it is up. Raises ``NetworkError``."""
        ready_read, ready_write = os.pipe()
        exit_read, self._exit_write = os.pipe()
        argv = self._argv(target, owner, ready_write, exit_read)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(ready_write, exit_read, owner),
                start_new_session=True,
            )
        except OSError as exc:
            os.close(ready_read)
            raise NetworkError(f"could not start slirp4netns: {exc}") from exc
        finally:
            for fd in (ready_write, exit_read):
                os.close(fd)
        self._stderr = asyncio.create_task(self._log_stderr(build_id))
        proc = self.proc
        reading = asyncio.ensure_future(asyncio.to_thread(os.read, ready_read, 1))
        exited = asyncio.ensure_future(proc.wait())
        try:
            # Whichever comes first: "1" on the ready pipe, or slirp4netns
            # exiting (then the read sees the end of the pipe too).
            await asyncio.wait(
                {reading, exited}, timeout=_START_TIMEOUT, return_when="FIRST_COMPLETED"
            )
            ready = reading.result() if reading.done() and not reading.exception() else b""
        except BaseException:
            ready = b""
            raise
        finally:
            if ready != b"1":
                # Also on cancellation: slirp4netns must not outlive the
                # launch. The read ends with its pipe.
                await asyncio.shield(self.close())
                await asyncio.wait({reading}, timeout=_START_TIMEOUT)
            os.close(ready_read)
            await cancel_and_wait(exited)
        if ready != b"1":
            why = (
                f"it exited with {proc.returncode}"
                if proc.returncode is not None
                else f"not up within {_START_TIMEOUT:.0f} s"
            )
            if self.last_words:
                why += f" ({'; '.join(self.last_words)})"
            raise NetworkError(f"slirp4netns did not bring the build's network up: {why}")

    async def _fence(self, pid: int, build_id: str) -> None:
        """Blackhole routes in the build's namespace (which the build, with
        no capabilities, cannot remove) to link-local addresses (cloud
        metadata: instance credentials) and to this host's own addresses
        (its services bound to every interface). Raises ``NetworkError``."""
        root, ip = self.tools.root, self.tools.ip
        if ip is None or root is None:
            return
        commands = "".join(f"route add blackhole {prefix}\n" for prefix in fenced_prefixes())
        try:
            # As root in the host's user namespace, which holds every right
            # over the build's network namespace.
            proc = await asyncio.create_subprocess_exec(
                root.nsenter, f"--net=/proc/{pid}/ns/net", ip, "-batch", "-",
                env=self.env, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            raise NetworkError(f"could not fence the build's network: {exc}") from exc
        try:
            _out, err = await asyncio.wait_for(proc.communicate(commands.encode()), _START_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NetworkError("fencing the build's network took too long") from None
        if proc.returncode != 0:
            why = err.decode(errors="replace").strip()
            raise NetworkError(f"could not fence the build's network: {why}")
        log.debug("build network fenced", extra={"build_id": build_id})

    async def _log_stderr(self, build_id: str) -> None:
        """Its chatter (tap fds, exit events) at debug level; the last lines
        are kept for the error when it fails."""
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            text = line.decode(errors="replace").rstrip()
            if text:
                self.last_words.append(text)
                log.debug("slirp4netns: %s", text, extra={"build_id": build_id})

    async def close(self) -> None:
        """Stop slirp4netns (closing its exit pipe) and reap it. Bounded;
        never raises."""
        if self._exit_write >= 0:
            os.close(self._exit_write)
            self._exit_write = -1
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._stderr is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._stderr, 5)
