"""The two log formats: JSON lines for machines, text for people at a
terminal; and the release every line names."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import logging_setup
from common.logging_setup import (
    BUILD_ID,
    JsonFormatter,
    TextFormatter,
    bind,
    release,
)
from common.settings import ConfigError
from control.config import Settings
from conveyor.v1 import types_pb2 as pb
from tests.helpers import REPO_ROOT, Api, ControlHandle, RunnerProcess, git

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR)\s+\S+ .+")


def record(message: str, level: int = logging.INFO, **extra: str) -> logging.LogRecord:
    rec = logging.LogRecord("control.test", level, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def failing_record() -> logging.LogRecord:
    try:
        raise ValueError("bad value")
    except ValueError:
        rec = logging.LogRecord(
            "control.test", logging.ERROR, __file__, 1, "it broke", (), sys.exc_info()
        )
    return rec


@pytest.fixture
def fresh_release() -> Iterator[None]:
    release.cache_clear()
    yield
    release.cache_clear()


def test_json_lines_carry_the_fields_and_the_bound_ids() -> None:
    def inside_a_build() -> str:
        bind(build_id="b-1", project_id="p-1")
        return JsonFormatter("conveyor-control").format(record("build running"))

    line = contextvars.copy_context().run(inside_a_build)
    entry = json.loads(line)
    assert entry["message"] == "build running"
    assert entry["level"] == "info"
    assert entry["service"] == "conveyor-control"
    assert entry["release"] == release()
    assert entry["logger"] == "control.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])
    assert (entry["build_id"], entry["project_id"]) == ("b-1", "p-1")
    assert "account_id" not in entry
    # The binding stayed inside the context that made it.
    assert BUILD_ID.get() is None
    assert "build_id" not in json.loads(JsonFormatter("x").format(record("later")))


def test_extra_ids_win_over_the_context_and_errors_keep_their_traceback() -> None:
    def inside() -> dict[str, str]:
        bind(build_id="from-context", account_id="a-1")
        entry: dict[str, str] = json.loads(
            JsonFormatter("svc").format(record("x", build_id="from-extra"))
        )
        return entry

    entry = contextvars.copy_context().run(inside)
    assert (entry["build_id"], entry["account_id"]) == ("from-extra", "a-1")
    failed = json.loads(JsonFormatter("svc").format(failing_record()))
    assert failed["level"] == "error"
    assert "Traceback" in failed["error"]
    assert failed["error"].rstrip().endswith("ValueError: bad value")


def test_text_lines_read_left_to_right_with_the_ids_before_any_traceback() -> None:
    def inside() -> str:
        bind(build_id="b-2")
        return TextFormatter("conveyor-runner").format(failing_record())

    text = contextvars.copy_context().run(inside)
    first, *rest = text.splitlines()
    assert TEXT_LINE.match(first), first
    assert first.endswith(" ERROR   conveyor-runner it broke build_id=b-2")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: bad value"
    plain = TextFormatter("svc").format(record("plain"))
    assert plain.endswith(" INFO    svc plain")


def test_release_names_the_checkout_or_the_deployment(
    fresh_release: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_RELEASE", "v9.9.9-image")
    assert release() == "v9.9.9-image"
    release.cache_clear()
    monkeypatch.delenv("CONVEYOR_RELEASE")
    ours = release()
    version = logging_setup._package_version()
    head = git(REPO_ROOT, "rev-parse", "HEAD")
    if ours.startswith("v"):
        # Tagged: the tag, and the commit when past it (v1.2.0-3-gabc1234).
        assert re.fullmatch(r"v\d[\w.]*(-\d+-g[0-9a-f]+)?", ours), ours
    else:
        assert ours.startswith(f"{version}+g"), ours
        assert head.startswith(ours.removeprefix(f"{version}+g")), (ours, head)


def test_release_outside_a_checkout_is_the_package_version(tmp_path: Path) -> None:
    assert logging_setup._git_describe(tmp_path) is None
    # A repository that is not Conveyor's does not lend its commit.
    git(tmp_path, "init", "-q")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert logging_setup._git_describe(tmp_path) is None


def test_an_unknown_log_format_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"CONVEYOR_LOG_FORMAT": "xml"})
    assert str(err.value) == "CONVEYOR_LOG_FORMAT: must be json or text, not 'xml'"
    assert Settings.from_env({"CONVEYOR_LOG_FORMAT": "text"}).log_format == "text"
    with pytest.raises(ValueError, match="'yaml'"):
        logging_setup.configure("svc", "yaml")


async def test_control_serve_refuses_an_unknown_log_format_without_a_traceback() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor_cli.main", "control", "serve",
        env={**os.environ, "CONVEYOR_LOG_FORMAT": "xml",
             "CONVEYOR_DATABASE_URL": "postgresql://unused.invalid/x"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert out == b""
    assert err.decode() == "error: CONVEYOR_LOG_FORMAT: must be json or text, not 'xml'\n"


async def test_a_runner_started_with_text_logs_prints_readable_lines(
    control: ControlHandle, api: Api, repo: Path, tmp_path: Path
) -> None:
    runner = RunnerProcess(control.plane.grpc_address, control.runner_token, tmp_path / "runner")
    await runner.start("--log-format", "text")
    try:
        await control.wait_runners(1)
        project = await api.create_project("texty", repo)
        build = await api.trigger("texty")
        done = await api.wait_status(build.id)
        assert done.status == pb.BUILD_STATUS_SUCCEEDED
    finally:
        assert await runner.stop() == 0
    lines = [ln for ln in runner.log().splitlines() if ln.strip()]
    assert lines
    for line in lines:
        assert not line.startswith("{"), line
        assert TEXT_LINE.match(line), line
    assert any(" conveyor-runner registered with the control plane as " in ln for ln in lines)
    finished = [ln for ln in lines if " conveyor-runner build finished: succeeded" in ln]
    assert len(finished) == 1, lines
    assert finished[0].endswith(f"build_id={build.id} project_id={project.id}")


def test_the_shared_log_setup_needs_only_the_standard_library() -> None:
    """The runner tags its lines with the same context variables as the
    control plane through ``common.logging_setup``; that module needs nothing
    outside the standard library, so the runner takes nothing of the control
    plane with it (``tests/test_layers.py`` keeps ``control`` out of it)."""
    from tests.test_layers import SRC, imports_of

    needs = {name.split(".")[0] for name in imports_of(SRC / "common" / "logging_setup.py")}
    assert needs <= set(sys.stdlib_module_names) | {"__future__"}, needs
