"""The one Nomad client: both halves (python-nomad in threads, blocking
queries and log streams on aiohttp) fail with the same error type, against
the Nomad API double."""

from __future__ import annotations

import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runner.launchers.nomad_client import NomadApiError, NomadClient, NomadNotFound
from runner.launchers.nomad_job import NomadSettings
from tests.nomad_double import NomadDouble


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[NomadClient]:
    async with NomadDouble(tmp_path / "nomad") as double:
        nomad = NomadClient(NomadSettings(address=double.url, request_timeout_seconds=5.0))
        try:
            yield nomad
        finally:
            await nomad.close()


async def test_a_missing_object_is_not_found_from_either_half(client: NomadClient) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NomadNotFound) as threaded:
        await client.read_evaluation(missing)
    with pytest.raises(NomadNotFound) as blocking:
        await client.blocking_get(f"/v1/allocation/{missing}", 0)
    with pytest.raises(NomadNotFound) as streamed:
        async with client.logs(missing, "stdout", 0, follow=False):
            pass
    for caught in (threaded, blocking, streamed):
        assert caught.value.status == 404
        assert str(caught.value).startswith("HTTP 404")


async def test_a_refused_request_carries_nomads_status_and_words(client: NomadClient) -> None:
    with pytest.raises(NomadApiError) as caught:
        await client.register_job({"ID": "conveyor-build-x", "TaskGroups": "not a list"})
    assert caught.value.status == 400
    assert not isinstance(caught.value, NomadNotFound)
    assert str(caught.value).startswith("HTTP 400")


async def test_no_answer_at_all_is_the_same_error_without_a_status() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    settings = NomadSettings(address=f"http://127.0.0.1:{port}", request_timeout_seconds=2.0)
    nomad = NomadClient(dataclasses.replace(settings, blocking_wait_seconds=1.0))
    try:
        with pytest.raises(NomadApiError) as threaded:
            await nomad.deregister_job("conveyor-build-x")
        with pytest.raises(NomadApiError) as blocking:
            await nomad.blocking_get("/v1/job/conveyor-build-x/allocations", 0)
        with pytest.raises(NomadApiError) as streamed:
            async with nomad.logs("a", "stdout", 0, follow=False):
                pass
    finally:
        await nomad.close()
    for caught in (threaded, blocking, streamed):
        assert caught.value.status is None
        assert str(caught.value)
