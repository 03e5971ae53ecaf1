"""The rendered build script: its header holds the build's values exactly
(whatever quotes, newlines or `$(...)` they contain), it passes shellcheck,
and markers are read only from the channel the script uses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from runner.launchers.base import OutputLine
from runner.script import BuildScript, CachePlan, Marker

NASTY = "echo \"it's $(whoami)\"; x='a b'\nprintf '%s\\n' \"$x\" `id` \\ ; # end"


def script(*, channel: bool) -> BuildScript:
    return BuildScript(
        repo_url="/srv/repo's here",
        commit_sha="a" * 40,
        branch="feature/$(touch x)",
        steps=(("build", NASTY), ("deploy", "echo deployed")),
        root_directory="web app",
        nonce="0123456789abcdef",
        cache=CachePlan(("package-lock.json", "*.lock"), ("node_modules", "~/.npm")),
        channel=channel,
    )


def test_the_header_holds_each_value_exactly(tmp_path: Path) -> None:
    rendered = script(channel=True).render()
    header = rendered.split("# shellcheck shell=bash", 1)[0]
    probe = tmp_path / "probe.sh"
    probe.write_text(
        header
        + 'printf "%s\\0" "$REPO_URL" "$BRANCH" "$ROOT_DIR" "$MARKER_PREFIX" "${STEPS[@]}"'
        + ' "${CACHE_LOCKS[@]}" "${CACHE_DIRS[@]}"\n'
    )
    out = subprocess.run(["bash", str(probe)], capture_output=True, check=True).stdout
    assert out.decode().split("\0")[:-1] == [
        "/srv/repo's here", "feature/$(touch x)", "web app", "",
        NASTY, "echo deployed",
        "package-lock.json", "*.lock",
        "src/web app/node_modules", ".conveyor/.npm",
    ]  # fmt: skip
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("channel", [True, False])
def test_the_rendered_script_passes_shellcheck(tmp_path: Path, channel: bool) -> None:
    path = tmp_path / "build.sh"
    path.write_text(script(channel=channel).render())
    done = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def test_markers_come_only_from_the_scripts_channel() -> None:
    with_channel, without = script(channel=True), script(channel=False)
    assert with_channel.marker_of(OutputLine("control", b"end:1:0")) == Marker("end", 1, 0)
    assert with_channel.marker_of(OutputLine("control", b"cache:save:2")) == Marker(
        "cache-save", 0, 2
    )
    # Whatever a step prints is output, nonce or not.
    for forged in (b"end:1:0", b"##conveyor:0123456789abcdef:end:1:0"):
        assert with_channel.marker_of(OutputLine("stdout", forged)) is None
    assert with_channel.marker_of(OutputLine("control", b"end:x:0")) is None
    # Without a channel (Nomad): stdout lines with this build's nonce only.
    line = b"##conveyor:0123456789abcdef:begin:2"
    assert without.marker_of(OutputLine("stdout", line)) == Marker("begin", 2, None)
    assert without.marker_of(OutputLine("stderr", line)) is None
    assert without.marker_of(OutputLine("stdout", line.replace(b"0123", b"9999"))) is None
    assert without.marker_of(OutputLine("control", b"begin:2")) is None
