"""The committed stubs in src/conveyor/v1 are exactly what proto/ generates."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.helpers import REPO_ROOT


def test_generated_stubs_match_the_protos() -> None:
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "check-stubs")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_catches_a_changed_proto(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("proto", "scripts", "src"):
        shutil.copytree(REPO_ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("buf.yaml", "buf.gen.yaml"):
        shutil.copy(REPO_ROOT / name, copy / name)
    (copy / ".venv").symlink_to(REPO_ROOT / ".venv")
    proto = copy / "proto" / "conveyor" / "v1" / "scheduler_service.proto"
    proto.write_text(
        proto.read_text().replace(
            "message WakeRequest {}", "message WakeRequest {\n  string why = 1;\n}"
        )
    )
    result = subprocess.run(
        [str(copy / "scripts" / "check-stubs")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "stale" in result.stderr
