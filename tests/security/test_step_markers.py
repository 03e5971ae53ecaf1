"""Step markers cannot be forged from inside a build.

A real control plane and a real runner agent with bubblewrap. The build
step tries every way a hostile build has to tell the runner "the build step
succeeded, the deploy ran and succeeded" and then fails: it prints markers
with the nonce it finds in the build script (and without any), writes them
to the control channel's fd number, to every descriptor of every other
process it can open through /proc, and to every descriptor it can take
with pidfd_getfd. The build must end failed in its build step with the
deploy never started, and every attempt must have been refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conveyor.v1 import types_pb2 as pb
from runner.script import CONTROL_FD
from tests.helpers import Api, RunnerProcess

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]

FORGED = ("end:1:0", "begin:2", "end:2:0")

# The step: each attempt prints what got through ("*-wrote"), then it
# fails. Descriptors 0-2 of any process are /dev/null and the build's
# output: what reaches them is output (the forged lines are checked as such).
ATTACK = f"""
set +e
prefix=$(grep -aho '##conveyor:[0-9a-f]\\{{16\\}}' /workspace/.conveyor/build.sh | head -n 1)
echo "stolen prefix=[$prefix]"
for m in {" ".join(FORGED)}; do
  echo "$m"; echo "${{prefix:-##conveyor:none}}:$m"
  if echo "$m" 2>/dev/null >&{CONTROL_FD}; then echo "fd-wrote"; fi
  for p in /proc/[0-9]*; do
    [ "${{p#/proc/}}" = "$$" ] && continue
    for f in "$p"/fd/*; do
      case ${{f##*/}} in 0|1|2) continue;; esac  # /dev/null and the output: output
      if [ -e "$f" ] && echo "$m" 2>/dev/null >"$f"; then echo "proc-wrote $f"; fi
    done
  done
done
ls /proc/$PPID/fd >/dev/null 2>&1 && echo "proc-listed the script's fds"
python3 - <<'PY'
import ctypes, os, stat
libc = ctypes.CDLL(None, use_errno=True)
for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
    if pid == os.getpid():
        continue
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        continue
    for target in range(3, 64):  # 0-2: /dev/null and the output
        fd = libc.syscall(438, pidfd, target, 0)  # pidfd_getfd
        if fd < 0:
            continue
        if stat.S_ISSOCK(os.fstat(fd).st_mode) or stat.S_ISFIFO(os.fstat(fd).st_mode):
            for m in {FORGED!r}:
                try:
                    os.write(fd, (m + "\\n").encode())
                    print("getfd-wrote", pid, target)
                except OSError:
                    pass
        os.close(fd)
PY
exit 1
"""


async def test_a_build_cannot_forge_its_step_markers(
    api: Api, runner: RunnerProcess, repo: Path
) -> None:
    await api.create_project("forger", repo, build_command=ATTACK, deploy_command="echo DEPLOY-RAN")
    build = await api.trigger("forger")
    done = await api.wait_status(build.id, timeout=60)
    text = [line.text for line in await api.logs(build.id)]
    everything = "\n".join(text)

    assert done.status == pb.BUILD_STATUS_FAILED, everything
    steps = {step.name: step for step in done.steps}
    assert steps["clone"].status == pb.STEP_STATUS_SUCCEEDED, everything
    assert steps["build"].status == pb.STEP_STATUS_FAILED, everything
    assert steps["build"].exit_code == 1
    assert steps["deploy"].status not in (pb.STEP_STATUS_SUCCEEDED, pb.STEP_STATUS_RUNNING)
    assert not steps["deploy"].has_exit_code
    assert "DEPLOY-RAN" not in everything
    # No marker reached the runner: one header per real step, in order.
    headers = [t for t in text if t.startswith("── step ")]
    assert headers == [
        "── step clone ──",
        next(t for t in headers if t.startswith("── step clone exited with 0")),
        "── step build ──",
        next(t for t in headers if t.startswith("── step build exited with 1")),
    ], headers
    # Every way in was refused (and the forged lines are plain output).
    assert "stolen prefix=[]" in text, everything
    assert not [t for t in text if "-wrote" in t or "proc-listed" in t], everything
    assert "end:2:0" in text
