"""The one client of Nomad's HTTP API.

python-nomad does what it can: registering and deregistering jobs, the
build's secrets Variable, reading an evaluation, signalling an allocation.
It is synchronous, so each call runs in a thread. Two things it cannot do
sit beside it here, on aiohttp, with the same address, token, namespace,
region and TLS settings:
blocking queries (``?index=N&wait=..`` and the ``X-Nomad-Index`` header) and
following a task's log through ``/v1/client/fs/logs`` (a stream of JSON
frames, decoded by ``nomad_logs``).

Every failure of either half is a ``NomadApiError``: ``NomadNotFound`` for
404, ``status`` for another error answer, ``None`` when no answer came.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

import aiohttp
import nomad
import requests
from nomad.api import exceptions as nomad_errors

from runner.errors import RunnerError
from runner.launchers.nomad_job import TASK, NomadSettings

LogStream = Literal["stdout", "stderr"]


class NomadApiError(RunnerError):
    """A request to Nomad failed. ``status`` is the HTTP status of Nomad's
    answer, or None when none came (connection, timeout, a body that is
    not JSON); the message says which and quotes the start of the answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NomadNotFound(NomadApiError):
    """Nomad answered 404: no such job, allocation, evaluation or Variable."""


class NomadClient:
    """Nomad's HTTP API for one launcher. The caller must ``await close()``.

    Every method raises ``NomadApiError`` (``NomadNotFound`` for 404)."""

    def __init__(self, settings: NomadSettings) -> None:
        self._settings = settings
        self._requests = requests.Session()
        client_cert: tuple[str, str] | str | tuple[()] = ()
        if settings.client_cert and settings.client_key:
            client_cert = (settings.client_cert, settings.client_key)
        elif settings.client_cert:
            client_cert = settings.client_cert
        self._nomad: Any = nomad.Nomad(
            address=settings.address,
            token=settings.token,
            namespace=settings.namespace,
            region=settings.region,
            timeout=max(1, round(settings.request_timeout_seconds)),
            verify=settings.ca_cert or not settings.skip_verify,
            cert=client_cert,
            session=self._requests,
        )
        self._session: aiohttp.ClientSession | None = None

    def scope(self) -> dict[str, str]:
        """Query parameters every request carries."""
        params = {}
        if self._settings.namespace:
            params["namespace"] = self._settings.namespace
        if self._settings.region:
            params["region"] = self._settings.region
        return params

    # python-nomad, in threads.

    async def register_job(self, job: Mapping[str, Any]) -> Mapping[str, Any]:
        """Register ``job`` (the ``Job`` object); Nomad's answer (``EvalID``,
        ``Warnings``)."""
        answer = await self._call(self._nomad.jobs.register_job, {"Job": job})
        return dict(answer or {})

    async def deregister_job(self, job_id: str) -> None:
        """Stop and purge a job."""
        await self._call(self._nomad.job.deregister_job, job_id, purge=True)

    async def create_variable(self, path: str, items: Mapping[str, str]) -> None:
        """Store ``items`` as the Variable at ``path`` (in the namespace)."""
        payload: dict[str, Any] = {"Path": path, "Items": dict(items)}
        if self._settings.namespace:
            payload["Namespace"] = self._settings.namespace
        await self._call(
            self._nomad.variable.create_variable,
            path,
            payload,
            namespace=self._settings.namespace,
        )

    async def delete_variable(self, path: str) -> None:
        await self._call(
            self._nomad.variable.delete_variable, path, namespace=self._settings.namespace
        )

    async def signal_allocation(self, alloc_id: str, signal: str, task: str) -> None:
        """Send ``signal`` (``SIGKILL``) to ``task`` of an allocation."""
        await self._call(self._nomad.client.allocation.signal_allocation, alloc_id, signal, task)

    async def read_evaluation(self, eval_id: str) -> Mapping[str, Any]:
        response = await self._call(
            self._nomad.evaluation.request, eval_id, method="get", params=self.scope()
        )
        try:
            return dict(response.json())
        except ValueError as exc:
            raise NomadApiError(f"evaluation {eval_id}: the answer is not JSON ({exc})") from None

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except nomad_errors.BaseNomadException as exc:
            raise _translated(exc) from None

    # What python-nomad lacks, on aiohttp.

    async def blocking_get(
        self, path: str, index: int, query: Mapping[str, str] | None = None
    ) -> tuple[Any, int]:
        """GET ``path`` with ``query``; with ``index`` > 0, Nomad holds the
        answer until its index passes ``index`` or the wait ends. Returns the
        body and the new ``X-Nomad-Index``."""
        wait = self._settings.blocking_wait_seconds
        params = self.scope() | dict(query or {})
        if index > 0:
            params.update(index=str(index), wait=f"{round(wait * 1000)}ms")
        # Nomad adds up to wait/16 of jitter to a blocking query.
        timeout = aiohttp.ClientTimeout(
            total=wait * 17 / 16 + self._settings.request_timeout_seconds
        )
        try:
            async with self._http().get(
                self._url(path), params=params, timeout=timeout
            ) as response:
                await _check(response)
                body = await response.json(content_type=None)
                return body, int(response.headers.get("X-Nomad-Index") or 0)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise NomadApiError(_no_answer(exc)) from exc

    @contextlib.asynccontextmanager
    async def logs(
        self, alloc_id: str, stream: LogStream, offset: int, follow: bool
    ) -> AsyncIterator[aiohttp.StreamReader]:
        """Open ``/v1/client/fs/logs`` for the build task at a byte ``offset``
        counted from the start of the first log file. Reading the stream
        inside the block may raise ``NomadApiError`` too (it broke)."""
        params = self.scope()
        params.update(
            task=TASK,
            type=stream,
            follow=str(follow).lower(),
            offset=str(offset),
            origin="start",
        )
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._settings.request_timeout_seconds
        )
        url = self._url(f"/v1/client/fs/logs/{alloc_id}")
        try:
            async with self._http().get(url, params=params, timeout=timeout) as response:
                await _check(response)
                yield response.content
        except (aiohttp.ClientError, OSError) as exc:
            raise NomadApiError(_no_answer(exc)) from exc

    async def close(self) -> None:
        """Close both halves' connections. Safe to call twice."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._requests.close()

    def _url(self, path: str) -> str:
        return self._settings.address.rstrip("/") + path

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"X-Nomad-Token": self._settings.token} if self._settings.token else {}
            connector = aiohttp.TCPConnector(ssl=self._ssl_context())
            self._session = aiohttp.ClientSession(headers=headers, connector=connector)
        return self._session

    def _ssl_context(self) -> ssl.SSLContext | bool:
        """The TLS python-nomad gets as ``verify`` and ``cert``, for aiohttp."""
        settings = self._settings
        if not settings.address.startswith("https:"):
            return True
        context = ssl.create_default_context(cafile=settings.ca_cert)
        if settings.client_cert:
            context.load_cert_chain(settings.client_cert, settings.client_key)
        if settings.skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


async def _check(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    message = _status_message(response.status, await response.text())
    if response.status == 404:
        raise NomadNotFound(message, 404)
    raise NomadApiError(message, response.status)


def _status_message(status: int, text: str) -> str:
    text = text.strip()[:300]
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def _no_answer(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _translated(exc: nomad_errors.BaseNomadException) -> NomadApiError:
    """python-nomad's error as ours: it carries either Nomad's answer or the
    requests error that kept one from coming."""
    response = getattr(exc, "nomad_resp", None)
    if isinstance(response, requests.Response):
        message = _status_message(response.status_code, response.text)
        if response.status_code == 404:
            return NomadNotFound(message, 404)
        return NomadApiError(message, response.status_code)
    return NomadApiError(_no_answer(response if response is not None else exc))
