"""Fixtures the runner tests share: a scratch directory build users can
reach, a local launcher in it, and moto's standalone S3 server with a
store on it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import boto3
import pytest
import pytest_asyncio
from moto.server import ThreadedMotoServer

from runner.cache import S3Cache
from runner.launchers.local import LocalLauncher


@pytest.fixture
def build_dir() -> Iterator[Path]:
    """A scratch directory that build users can reach, outside pytest's
    basetemp: pytest resets /tmp/pytest-of-<user> to mode 0700 whenever a
    session starts, which would cut build users off their workspaces if
    another session on this host starts while this one runs."""
    path = Path(tempfile.mkdtemp(prefix="conveyor-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def launcher(build_dir: Path) -> AsyncIterator[LocalLauncher]:
    """The local launcher as a runner makes it (modules may override)."""
    local = LocalLauncher(build_dir / "workspaces")
    try:
        yield local
    finally:
        await local.close()


@pytest.fixture
def s3_store(moto_endpoint: str) -> S3Cache:
    """An S3 cache store on a fresh bucket of moto's server, through boto3."""
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    bucket = f"b{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    return S3Cache(client, bucket)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server over HTTP on a free port, for boto3 to talk to."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
