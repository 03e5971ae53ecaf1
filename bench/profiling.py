"""Optional py-spy profiles of the Conveyor processes while a part runs.

With ``python -m bench --profile DIR`` each control plane (and the runner
agent of `conveyor up`) is sampled by ``py-spy record --nonblocking`` for
the whole part; the collapsed stacks go to DIR/<part>-<process>.txt (load
them in speedscope, or summarise them with ``python -m bench.profiling
FILE``). py-spy must be installed (``pip install py-spy``); it needs ptrace
rights over the process (root, or the same user with ptrace_scope 0).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

RATE = 100  # samples per second


def py_spy() -> str | None:
    """The py-spy executable: next to this Python, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """Records one process until ``stop``. Never raises: a profile that
    cannot be taken is reported on stderr and the part goes on."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        exe = py_spy()
        if exe is None:
            print("   (py-spy is not installed: no profile)", file=sys.stderr)
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.with_suffix(".log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                exe, "record", "--pid", str(self.pid), "--output", str(self.out),
                "--format", "raw", "--rate", str(RATE), "--nonblocking",
                stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip

    async def stop(self) -> None:
        """Stop sampling; py-spy writes the file on SIGINT."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def top(path: Path, limit: int = 25) -> list[tuple[str, float, float]]:
    """(frame, self %, total %) of the most expensive frames in a collapsed
    stack file, by self time."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    if not samples:
        return []
    return [
        (frame, 100 * n / samples, 100 * total[frame] / samples)
        for frame, n in own.most_common(limit)
    ]


def top_inclusive(path: Path, needle: str, limit: int = 25) -> list[tuple[str, float]]:
    """Frames whose text contains ``needle``, by inclusive share of samples."""
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples += int(count)
        for frame in {f for f in stack.split(";") if needle in f}:
            total[frame] += int(count)
    return [(f, 100 * n / max(samples, 1)) for f, n in total.most_common(limit)]


if __name__ == "__main__":
    file = Path(sys.argv[1])
    print(f"{'self %':>7} {'total %':>7}  frame")
    for frame, self_pct, total_pct in top(file):
        print(f"{self_pct:7.1f} {total_pct:7.1f}  {frame}")
    if len(sys.argv) > 2:
        print(f"\ninclusive, frames containing {sys.argv[2]!r}:")
        for frame, pct in top_inclusive(file, sys.argv[2]):
            print(f"{pct:7.1f}  {frame}")
