"""The one interceptor every RPC passes through.

It authenticates the ``authorization: Bearer ...`` metadata and checks the
method's required access *before the request is read*: gRPC buffers a whole
request message (up to the server's receive limit) before a unary handler
runs, so a caller that is turned away gets a handler that never reads it,
and an anonymous 15 MiB request costs the server nothing but its headers.
Then it puts the caller in a contextvar for the handler, turns the error
tree into status codes with a sentence, logs an unexpected failure once with
its context, and records the request metrics.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
from grpc import aio

from common.logging_setup import bind
from control.api.errors import status_of
from control.errors import ConveyorError, PermissionDenied, Unauthenticated
from control.metrics import ControlMetrics
from control.services.access import granted
from control.storage import build_tokens
from control.storage.accounts import AccountStore, Principal
from control.storage.builds import is_uuid

log = logging.getLogger(__name__)

Ctx = aio.ServicerContext[Any, Any]
PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")
BEARER: contextvars.ContextVar[str] = contextvars.ContextVar("bearer", default="")

_CONFIG = "/conveyor.v1.ConfigService/"
_SCHED = "/conveyor.v1.SchedulerService/"
_BM = "/conveyor.v1.BuildManager/"
_RUNNER = "/conveyor.v1.RunnerService/"

# What each method needs: a user scope, "internal" (the control plane's own
# credential, never a user token whatever its scopes: the scheduler's RPCs
# bypass accounts and limits), "runner" (a runner token) or "build" (the
# build's own token, checked by the handler against the build it names).
ACCESS: dict[str, str] = {
    _CONFIG + "CreateProject": "write",
    _CONFIG + "GetProject": "read",
    _CONFIG + "ListProjects": "read",
    _CONFIG + "UpdateProject": "write",
    _CONFIG + "DeleteProject": "write",
    _CONFIG + "RotateWebhookSecret": "admin",
    _CONFIG + "TriggerBuild": "write",
    _CONFIG + "ListBuilds": "read",
    _CONFIG + "GetBuild": "read",
    _CONFIG + "RetryBuild": "write",
    _CONFIG + "ListRunners": "read",
    _CONFIG + "PurgeCache": "write",
    _CONFIG + "SetEnvVar": "write",
    _CONFIG + "UnsetEnvVar": "write",
    _CONFIG + "ListEnvVars": "read",
    _CONFIG + "CreateToken": "admin",
    _CONFIG + "ListTokens": "admin",
    _CONFIG + "RevokeToken": "admin",
    _CONFIG + "ListAuditEvents": "admin",
    _CONFIG + "CreateAccount": "system",
    _CONFIG + "RotateSecrets": "system",
    _CONFIG + "CreateDeployHook": "write",
    _CONFIG + "ListDeployHooks": "read",
    _CONFIG + "RevokeDeployHook": "write",
    _SCHED + "Wake": "internal",
    _SCHED + "GetQueue": "read",
    _BM + "StartBuild": "internal",
    _BM + "CancelBuild": "write",
    _BM + "StreamLogs": "read",
    _BM + "ReadLogs": "read",
    _RUNNER + "Connect": "runner",
    _RUNNER + "ReportStatus": "build",
    _RUNNER + "AppendLogs": "build",
}
PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
_CACHE_SECONDS = 2.0


def principal() -> Principal:
    """The authenticated caller of the current RPC."""
    return PRINCIPAL.get()


def account_of_caller() -> str:
    """The caller's account id; raises ``PermissionDenied`` for non-users."""
    who = PRINCIPAL.get()
    if who.account_id is None:
        raise PermissionDenied("this token does not belong to an account")
    return who.account_id


class Authenticator:
    """Resolves bearer tokens, with a short cache so a log-heavy build does
    not cost a database round trip per request."""

    def __init__(self, accounts: AccountStore, internal_token: str) -> None:
        self.accounts = accounts
        self.internal_token = internal_token
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def resolve(self, token: str) -> Principal | None:
        if token and secrets.compare_digest(token, self.internal_token):
            return Principal("internal", None, None, "conveyor", frozenset({"system"}))
        hit = self._cache.get(token)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        found = await self.accounts.authenticate(token)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token] = (time.monotonic() + _CACHE_SECONDS, found)
        return found

    async def build_of(self, token: str) -> str | None:
        """The build whose live token ``token`` is, or None. Not cached: a
        build's token dies with the build, and the lookup replaces the
        handler's own. Raises ``Unavailable`` when the database is down."""
        return await build_tokens.build_of(self.accounts.db, token)


def _check(method: str, who: Principal | None, token: str) -> Principal:
    need = ACCESS.get(method)
    if need is None:
        raise PermissionDenied(f"method {method} is not exposed")
    if need == "build":
        if not token.startswith("cvb_"):
            raise Unauthenticated("this call needs the build's own token")
        return Principal("build", None, None, "build", frozenset())
    if who is None:
        raise Unauthenticated("missing or unknown token (authorization: Bearer <token>)")
    if need == "runner":
        if who.kind != "runner" and who.kind != "internal":
            raise PermissionDenied("this call needs a runner token")
        return who
    if need == "internal":
        if who.kind == "internal":
            return who
        raise PermissionDenied("this call is for the control plane itself")
    if who.kind == "internal":
        return who
    if who.kind != "user":
        raise PermissionDenied("this call needs a user token")
    if need not in granted(who):
        raise PermissionDenied(f"this call needs the {need!r} scope")
    return who


def _bind_log_context(request: Any, who: Principal) -> None:
    """Tag every log line of this RPC with the caller's account and the
    build or project the request names (each RPC runs in its own task, so
    the tags end with it). Only well-formed ids: a client's junk never
    reaches the logs."""
    build_id = getattr(request, "build_id", "")
    project_id = getattr(request, "project_id", "")
    bind(
        build_id=build_id if isinstance(build_id, str) and is_uuid(build_id) else None,
        project_id=project_id if isinstance(project_id, str) and is_uuid(project_id) else None,
        account_id=who.account_id,
    )


class EdgeInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs leaves it generic
    def __init__(self, auth: Authenticator, metrics: ControlMetrics) -> None:
        self.auth = auth
        self.metrics = metrics

    async def _admit(self, method: str, token: str) -> Principal:
        """The caller of ``method``, from the metadata alone; raises the
        error tree's ``Unauthenticated`` or ``PermissionDenied`` (or
        ``Unavailable`` when the database is down)."""
        if token.startswith("cvb_"):
            # A build token names its build; the handler checks that the
            # request names the same one. Looked up here, before the request
            # is read, so that a made-up token never gets a log batch read.
            caller = _check(method, None, token)
            build_id = await self.auth.build_of(token)
            if build_id is None:
                raise Unauthenticated("the build token is not valid (or its build ended)")
            return replace(caller, build_id=build_id)
        who = await self.auth.resolve(token) if token else None
        return _check(method, who, token)

    def _refusal(self, handler: Any, short: str, code: grpc.StatusCode, details: str) -> Any:
        """A handler that answers ``code`` without reading the request: it
        takes the request as a stream and never iterates it, so gRPC never
        buffers the message (whatever its size, up to the receive limit)."""

        async def refuse(requests: Any, context: Ctx) -> None:
            self.metrics.grpc_requests.labels(short, code.name).inc()
            await context.abort(code, details)

        if handler.unary_unary or handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                refuse, response_serializer=handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            refuse, response_serializer=handler.response_serializer
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        # Typed as Any: grpc-stubs describes the sync handler signatures only.
        handler: Any = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        token = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                token = value.removeprefix("Bearer ").strip()
        short = method.rsplit("/", 1)[-1]
        try:
            caller = await self._admit(method, token)
        except ConveyorError as exc:
            return self._refusal(handler, short, status_of(exc), str(exc))
        except Exception:
            log.exception("unexpected failure authenticating %s", method)
            return self._refusal(
                handler, short, grpc.StatusCode.INTERNAL, "internal error; it was logged"
            )

        async def enter(request: Any) -> None:
            BEARER.set(token)
            PRINCIPAL.set(caller)
            _bind_log_context(request, caller)

        async def fail(context: Ctx, exc: BaseException) -> None:
            if isinstance(exc, ConveyorError):
                code = status_of(exc)
                self.metrics.grpc_requests.labels(short, code.name).inc()
                await context.abort(code, str(exc))
            log.exception("unexpected failure in %s", method)
            self.metrics.grpc_requests.labels(short, "INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; it was logged")

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: Ctx) -> Any:
                began = time.perf_counter()
                try:
                    await enter(request)
                    response = await inner_uu(request, context)
                except Exception as exc:
                    if isinstance(exc, aio.AbortError):
                        raise
                    await fail(context, exc)
                    raise
                finally:
                    self.metrics.grpc_seconds.labels(short).observe(time.perf_counter() - began)
                self.metrics.grpc_requests.labels(short, "OK").inc()
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        stream_fn: Callable[[Any, Ctx], AsyncIterator[Any]] = (
            handler.unary_stream or handler.stream_stream
        )

        async def streaming(request: Any, context: Ctx) -> AsyncIterator[Any]:
            began = time.perf_counter()
            try:
                await enter(request)
                async for item in stream_fn(request, context):
                    yield item
            except Exception as exc:
                if isinstance(exc, aio.AbortError):
                    raise
                await fail(context, exc)
                raise
            finally:
                self.metrics.grpc_seconds.labels(short).observe(time.perf_counter() - began)
            self.metrics.grpc_requests.labels(short, "OK").inc()

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            streaming,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
