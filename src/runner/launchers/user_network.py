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

slirp4netns runs outside the sandbox, with the build's uid where
/dev/net/tun is open to all (the usual mode), joins the user namespace that
owns the sandbox's network namespace to configure the device, and sandboxes
itself (its own mount namespace with nothing in it, a seccomp filter; when
started as root, no capabilities either): it parses the build's packets.
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
from collections.abc import Sequence

import psutil

from runner.pipes import close_fd, data_fd

log = logging.getLogger(__name__)

# The resolver configuration the sandbox gets in place of the host's.
RESOLV_CONF = "nameserver 10.0.2.3\n"
# 65520: the largest MTU slirp4netns takes; fewer packets, much faster.
MTU = 65520
_START_TIMEOUT = 10.0
_NS_GET_USERNS = 0xB701  # ioctl_ns(2)


class NetworkError(Exception):
    """The build's network could not be set up; the message says why."""


def available() -> str | None:
    """The slirp4netns executable, or None when it is not installed."""
    return shutil.which("slirp4netns")


def _owning_userns(pid: int) -> int:
    """A descriptor of the user namespace that owns ``pid``'s network
    namespace: bubblewrap nests the build in a further user namespace
    (``--disable-userns``), which holds no rights over the network one."""
    net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(net, _NS_GET_USERNS)
    finally:
        os.close(net)


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
        self,
        slirp4netns: str,
        run_as: Sequence[str],
        env: dict[str, str],
        fence: tuple[str | None, str | None],
    ) -> None:
        """``run_as`` prefixes the command (``setpriv`` to the build's uid
        for a root runner, empty otherwise); ``fence`` is ``fence_tools()``,
        looked up once by the launcher."""
        self.slirp4netns = slirp4netns
        self.nsenter, self.ip = fence
        self.run_as = list(run_as)
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self._exit_write = -1
        self._stderr: asyncio.Task[None] | None = None
        self.last_words: collections.deque[str] = collections.deque(maxlen=3)

    async def start(self, pid: int, build_id: str) -> None:
        """Attach a configured tap device to the network namespace of
        ``pid`` and return once it is up. Raises ``NetworkError``."""
        try:
            owner = _owning_userns(pid)
        except OSError as exc:
            raise NetworkError(f"the sandbox's network namespace is gone ({exc})") from exc
        ready_read, ready_write = os.pipe()
        exit_read, self._exit_write = os.pipe()
        argv = [
            *self.run_as,
            self.slirp4netns,
            "--configure",
            f"--mtu={MTU}",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--enable-seccomp",
            f"--userns-path=/proc/self/fd/{owner}",
            f"--ready-fd={ready_write}",
            f"--exit-fd={exit_read}",
            str(pid),
            "tap0",
        ]
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
            for fd in (ready_write, exit_read, owner):
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
            exited.cancel()
            if ready != b"1":
                # Also on cancellation: slirp4netns (root, maybe) must not
                # outlive the launch. The read ends with its pipe.
                await asyncio.shield(self.close())
                await asyncio.wait({reading}, timeout=_START_TIMEOUT)
            os.close(ready_read)
        if ready != b"1":
            why = (
                f"it exited with {proc.returncode}"
                if proc.returncode is not None
                else f"not up within {_START_TIMEOUT:.0f} s"
            )
            if self.last_words:
                why += f" ({'; '.join(self.last_words)})"
            raise NetworkError(f"slirp4netns did not bring the build's network up: {why}")
        try:
            await self._fence(pid, build_id)
        except BaseException:
            await asyncio.shield(self.close())
            raise

    async def _fence(self, pid: int, build_id: str) -> None:
        """Blackhole routes in the build's namespace (which the build, with
        no capabilities, cannot remove) to link-local addresses (cloud
        metadata: instance credentials) and to this host's own addresses
        (its services bound to every interface). Raises ``NetworkError``."""
        if self.ip is None or self.nsenter is None:
            return
        commands = "".join(f"route add blackhole {prefix}\n" for prefix in fenced_prefixes())
        try:
            # As root in the host's user namespace, which holds every right
            # over the build's network namespace.
            proc = await asyncio.create_subprocess_exec(
                self.nsenter, f"--net=/proc/{pid}/ns/net", self.ip, "-batch", "-",
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
