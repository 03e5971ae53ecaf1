"""The architecture's layering: generated protobuf stubs and gRPC stay at
the edge, and domain/ is pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
NO_STUBS = ("domain", "scheduler", "builds", "storage", "logs")
PURE_FORBIDDEN = ("conveyor", "grpc", "psycopg", "psycopg_pool", "aiohttp", "asyncio")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", NO_STUBS)
def test_generated_stubs_stay_out_of_the_core(package: str) -> None:
    offenders = {
        str(path.relative_to(SRC)): sorted(
            n for n in imports_of(path) if n.split(".")[0] in ("conveyor", "grpc")
        )
        for path in (SRC / "control" / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_domain_is_pure() -> None:
    offenders = {
        str(path.relative_to(SRC)): sorted(
            n for n in imports_of(path) if n.split(".")[0] in PURE_FORBIDDEN
        )
        for path in (SRC / "control" / "domain").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_control_client_talks_grpc_in_the_runner() -> None:
    talking = sorted(
        str(path.relative_to(SRC))
        for path in (SRC / "runner").rglob("*.py")
        if any(n.split(".")[0] == "grpc" for n in imports_of(path))
    )
    assert talking == ["runner/control_client.py"]


def test_only_control_client_sees_protobuf_in_the_runner() -> None:
    """The runner speaks its own types (``runner/domain.py``); the wire's
    generated messages are converted in ``control_client.py`` alone."""
    seeing = sorted(
        str(path.relative_to(SRC))
        for path in (SRC / "runner").rglob("*.py")
        if any(
            n == "conveyor" or n.startswith(("conveyor.", "google.protobuf"))
            for n in imports_of(path)
        )
    )
    assert seeing == ["runner/control_client.py"]


def test_the_runner_imports_nothing_of_the_control_plane() -> None:
    """A runner host installs the runner; what both sides need (log setup,
    retries) lives in ``common/``, which imports neither side."""
    offenders = {
        str(path.relative_to(SRC)): sorted(
            n for n in imports_of(path) if n.split(".")[0] in ("control", "conveyor_cli")
        )
        for path in (SRC / "runner").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    shared = {
        str(path.relative_to(SRC)): sorted(
            n for n in imports_of(path) if n.split(".")[0] in ("control", "runner", "conveyor_cli")
        )
        for path in (SRC / "common").rglob("*.py")
    }
    assert {k: v for k, v in shared.items() if v} == {}


def test_no_module_of_builds_issues_sql() -> None:
    """The lifecycle decides; storage/ reads and writes rows. A call of
    ``execute`` (or a cursor) in builds/ is SQL in the wrong home."""
    offenders = sorted(
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in (SRC / "control" / "builds").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in ("execute", "executemany", "cursor")
    )
    assert offenders == []
