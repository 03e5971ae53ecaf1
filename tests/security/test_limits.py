"""What a caller without credentials can make the control plane hold: no
request body before authentication (gRPC and HTTP), no connection past the
header and body timeouts, at most a bounded number of webhook bytes before
their signature is checked (issue 15, items 5 and 11)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from bench import hostile
from bench.context import Context
from bench.processes import Postgres
from control.http_limits import FORM_MAX_BYTES, WEBHOOK_BUDGET_BYTES
from tests.helpers import Api, ControlHandle

HEADER_SECONDS = 1.0
BODY_SECONDS = 1.5


@pytest_asyncio.fixture
async def quick(database_url: str) -> AsyncIterator[ControlHandle]:
    """A control plane whose HTTP side drops slow clients within seconds."""
    handle = ControlHandle(database_url)
    handle.plane.http_header_seconds = HEADER_SECONDS
    handle.plane.http_body_seconds = BODY_SECONDS
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


async def _open(control: ControlHandle) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(control.http_url)
    assert url.host is not None
    assert url.port is not None
    return await asyncio.open_connection(url.host, url.port)


async def _closed_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trickle: bytes, within: float
) -> float:
    """Send ``trickle`` one byte a second; return the seconds until the
    server closed the connection (fail after ``within``)."""
    began = time.monotonic()

    async def send() -> None:
        for byte in trickle:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass  # a 408/400 page may come first; the close is what counts
    except TimeoutError:
        pytest.fail(f"the server still held the connection after {within} s")
    finally:
        sender.cancel()
        writer.close()
    return time.monotonic() - began


@pytest.mark.timing(reason="the server must drop the client within its timeout (+ slack)")
async def test_a_client_sending_headers_a_byte_a_second_is_dropped(quick: ControlHandle) -> None:
    reader, writer = await _open(quick)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: " + b"s" * 100 + b"\r\n\r\n"
    took = await _closed_after(reader, writer, request, within=HEADER_SECONDS + 8)
    assert took < len(request)  # long before the head could have been complete


@pytest.mark.timing(reason="the server must drop the client within its timeout (+ slack)")
async def test_a_client_sending_a_body_a_byte_a_second_is_dropped(quick: ControlHandle) -> None:
    reader, writer = await _open(quick)
    head = (
        "POST /api/v1/projects HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {quick.admin_token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    await _closed_after(reader, writer, b'{"name": "slow"' + b" " * 985, BODY_SECONDS + 8)


async def test_a_json_body_arriving_in_pieces_is_read_whole(quick: ControlHandle) -> None:
    body = b'{"name": "pieces", "repo_url": "https://example.com/p.git", "build_command": "true"}'
    reader, writer = await _open(quick)
    writer.write(
        (
            "POST /api/v1/projects HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {quick.admin_token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body[:10]
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.write(body[10:])
    await writer.drain()
    status = (await reader.readline()).split()[1]
    writer.close()
    assert status == b"200"


async def test_an_anonymous_form_over_the_form_limit_is_refused_unread(
    quick: ControlHandle,
) -> None:
    async with aiohttp.ClientSession() as session:
        body = b"token=" + b"x" * (FORM_MAX_BYTES + 1)
        async with session.post(
            f"{quick.http_url}/login",
            data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as response:
            assert response.status == 413


async def test_unverified_webhook_bodies_in_flight_are_bounded(
    quick: ControlHandle, api: Api
) -> None:
    """Webhooks of a real project whose bodies never finish hold the budget;
    the next one is told to come back (503, Retry-After) instead of being
    read; once they are dropped, webhooks are read again."""
    project = await api.create_project("budget", "https://example.com/b.git")
    url = URL(quick.http_url)
    max_body = quick.settings.webhook_max_bytes
    # Bodies that fill the budget exactly, each as large as a webhook may be.
    lengths = [max_body] * (WEBHOOK_BUDGET_BYTES // max_body)
    if WEBHOOK_BUDGET_BYTES % max_body:
        lengths.append(WEBHOOK_BUDGET_BYTES % max_body)
    holders = []
    for length in lengths:
        reader, writer = await _open(quick)
        writer.write(
            (
                f"POST /webhooks/github/{project.id} HTTP/1.1\r\nHost: {url.host}\r\n"
                f"X-GitHub-Event: push\r\nContent-Length: {length}\r\n\r\n{{"
            ).encode()
        )
        await writer.drain()
        holders.append((reader, writer))
    await asyncio.sleep(0.3)  # each holder is now reading its body
    headers = {"X-GitHub-Event": "ping", "X-Hub-Signature-256": "sha256=" + "0" * 64}
    async with aiohttp.ClientSession() as session:
        hook = f"{quick.http_url}/webhooks/github/{project.id}"
        async with session.post(hook, data=b"{}", headers=headers) as response:
            assert response.status == 503
            assert response.headers["Retry-After"]
            assert (await response.json())["result"] == "busy"
        for reader, _writer in holders:
            async with asyncio.timeout(BODY_SECONDS + 8):
                while await reader.read(65536):
                    pass
        for _reader, writer in holders:
            writer.close()
        async with session.post(hook, data=b"{}", headers=headers) as response:
            assert response.status == 401  # read, and its signature checked


async def test_unauthenticated_requests_cost_no_memory(pg_server: str, tmp_path: Path) -> None:
    """A real `conveyor control serve` under the review's attack, scaled
    down: every request is refused and none raises the process's resident
    memory past the target (before the fix each one cost its size)."""
    work = tmp_path / "bench"
    work.mkdir()
    work.chmod(0o755)
    result = await hostile.run(
        Context(work, Postgres(url=pg_server)), requests=24, concurrency=12, size_mib=15
    )
    readings = {f.name: f.value for f in result.figures}
    assert [f.name for f in result.figures if f.met is False] == [], readings
    assert sum(f.met is True for f in result.figures) == 4
