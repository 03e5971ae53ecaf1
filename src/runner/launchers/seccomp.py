"""A seccomp filter for builds: the system calls a build never needs and an
attacker often does, refused with EPERM.

The list follows Docker's default profile where it refuses outright: the
kernel keyring (not namespaced: a key a build leaves in its uid's keyring
would reach the next build on that slot), kernel modules, kexec, BPF,
perf events, userfaultfd, io_uring, handle-based opens, other processes'
memory, mounting and namespaces (bubblewrap set the sandbox up before the
filter applies), clocks, swap, reboot, quotas, accounting and the like.

The program is classic BPF (``struct sock_filter``), built here with no
library: check the architecture (a build of another ABI is killed, as the
numbers would mean other calls), refuse x32 calls on x86_64, compare the
call number against the list, allow everything else. bubblewrap loads it
(``--seccomp FD``) right before it executes the build.
"""

from __future__ import annotations

import errno
import platform
import struct

from runner.pipes import data_fd

# Each name's number on x86_64 (asm/unistd_64.h).
DENIED_X86_64: dict[str, int] = {
    "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139, "vhangup": 153,
    "pivot_root": 155, "_sysctl": 156, "adjtimex": 159, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "iopl": 172, "ioperm": 173, "create_module": 174, "init_module": 175,
    "delete_module": 176, "get_kernel_syms": 177, "query_module": 178, "quotactl": 179,
    "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "move_pages": 279,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}  # fmt: skip
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000

# struct sock_filter opcodes and seccomp return values.
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
# struct seccomp_data: int nr; __u32 arch; ...
_NR_OFFSET = 0
_ARCH_OFFSET = 4


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(denied: dict[str, int] = DENIED_X86_64) -> bytes:
    """The filter for x86_64 refusing ``denied`` with EPERM."""
    numbers = sorted(set(denied.values()))
    refuse = _RET_ERRNO | errno.EPERM
    out = [
        _insn(_LD_W_ABS, 0, 0, _ARCH_OFFSET),
        _insn(_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _NR_OFFSET),
        # x32 calls reach the same kernel code under other numbers.
        _insn(_JGE_K, len(numbers) + 1, 0, _X32_SYSCALL_BIT),
    ]
    for i, number in enumerate(numbers):
        # On a match, jump over the remaining comparisons and the ALLOW.
        out.append(_insn(_JEQ_K, len(numbers) - i, 0, number))
    out += [_insn(_RET_K, 0, 0, _RET_ALLOW), _insn(_RET_K, 0, 0, refuse)]
    return b"".join(out)


def supported() -> bool:
    """Whether this host's architecture has a filter here (x86_64 only)."""
    return platform.machine() in ("x86_64", "AMD64")


def filter_fd() -> int:
    """A readable descriptor of the filter, as bubblewrap's ``--seccomp``
    wants it (it reads the program to its end). The caller passes it to the
    sandbox and closes it. Raises ``OSError``."""
    return data_fd(program())  # well under 1 KiB
