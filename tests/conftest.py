"""Shared fixtures: a real PostgreSQL, real control planes on port 0, real
runner processes and real git repositories in temp dirs."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from tests.helpers import Api, ControlHandle, ProtocolRunner, RunnerProcess, make_repo

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server for the session: CONVEYOR_TEST_DATABASE_URL,
    or the embedded one started in a temp dir."""
    url = os.environ.get("CONVEYOR_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from control.storage.embedded import EmbeddedPostgres

    base = tmp_path_factory.mktemp("pg")
    server = EmbeddedPostgres(base / "data")
    yield server.start()
    server.stop()


@pytest.fixture
def database_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database per test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = pg_server.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest_asyncio.fixture
async def control(database_url: str) -> AsyncIterator[ControlHandle]:
    """A control plane in this process on port 0, with fast deadlines."""
    handle = ControlHandle(database_url)
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


@pytest_asyncio.fixture
async def runner(control: ControlHandle, tmp_path: Path) -> AsyncIterator[RunnerProcess]:
    """A real runner agent process connected to ``control``."""
    proc = RunnerProcess(control.plane.grpc_address, control.runner_token, tmp_path / "runner")
    await proc.start()
    await control.wait_runners(1)
    try:
        yield proc
    finally:
        await proc.stop()


@pytest_asyncio.fixture
async def api(control: ControlHandle) -> AsyncIterator[Api]:
    client = Api(control.plane.grpc_address, control.admin_token)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit on main whose build.sh prints lines."""
    return make_repo(tmp_path / "repo")


@pytest_asyncio.fixture
async def proto_runner(control: ControlHandle) -> AsyncIterator[ProtocolRunner]:
    """A runner client in the test speaking the real runner protocol."""
    runner = ProtocolRunner(control.plane.grpc_address, control.runner_token)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.close()


def _import_skip(report: pytest.CollectReport | pytest.TestReport) -> bool:
    return report.skipped and "could not import" in str(report.longrepr)


# A test that skips because a module does not import hides a broken
# install: it fails instead (pytest.importorskip's reason says "could not
# import").
@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report: pytest.CollectReport = yield
    if _import_skip(report):
        report.outcome = "failed"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    if _import_skip(report):
        report.outcome = "failed"
    return report
