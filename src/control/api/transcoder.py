"""The HTTP/JSON API: gRPC methods served over HTTP from their
``google.api.http`` annotations.

The protos are the one definition of the API. This module reads each
annotated method's HTTP rule from the service descriptors, maps a request's
path, query and JSON body onto the method's request message (the proto3
JSON mapping, unknown fields refused), authorizes the caller with the very
table the gRPC edge uses, calls the same servicer method in this process and
answers its response message as JSON. A server-streaming method asked for
with ``Accept: text/event-stream`` answers Server-Sent Events. Adding an
annotated RPC needs no code here.

Errors answer ``{"code": "NOT_FOUND", "message": "...", "field": "..."}``
with the HTTP status of the gRPC code (google.rpc.Code's mapping).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from aiohttp import web
from google.api import annotations_pb2, http_pb2
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from control.api.edge import BEARER, PRINCIPAL, Authenticator, _bind_log_context, _check
from control.api.errors import status_of
from control.errors import ConveyorError, InvalidArgument, Unauthenticated
from control.metrics import ControlMetrics
from control.storage.accounts import Principal

log = logging.getLogger(__name__)

PREFIX = "/api/"
# Proxies drop a quiet connection after a minute or so; a comment line every
# KEEPALIVE_SECONDS keeps an SSE stream of a silent build open.
KEEPALIVE_SECONDS = 15.0
# The HTTP status of each gRPC code, as google.rpc.Code documents it.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
_VERBS = ("get", "put", "post", "delete", "patch")
_TEMPLATE_VAR = re.compile(r"\{([a-z_][a-z0-9_]*)(?:=([^}]*))?\}")

# The session of a dashboard page: returns its caller, or None when the
# request carries no valid session cookie.
CookieAuth = Callable[[web.Request], Awaitable[Principal | None]]
# Raises PermissionDenied when a cookie-authenticated request that changes
# state lacks its CSRF token.
CsrfCheck = Callable[[web.Request], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one gRPC method."""

    verb: str
    template: str
    pattern: re.Pattern[str]
    body: str
    method: str  # the gRPC path, "/conveyor.v1.ConfigService/GetProject"
    request_type: type[Message]
    streaming: bool
    call: Callable[[Message, Any], Any]


def _pattern(template: str) -> re.Pattern[str]:
    """A regex for a path template: ``{field}`` is one segment (no "/" and
    no ":", so ``{id}:cancel`` splits), ``{field=**}`` the rest."""
    out, at = [], 0
    for m in _TEMPLATE_VAR.finditer(template):
        out.append(re.escape(template[at : m.start()]))
        segment = ".+" if m.group(2) in ("**", "*/**") else "[^/:]+"
        out.append(f"(?P<{m.group(1)}>{segment})")
        at = m.end()
    out.append(re.escape(template[at:]))
    return re.compile("".join(out) + r"\Z")


def _bindings(rule: http_pb2.HttpRule) -> Iterable[tuple[str, str, str]]:
    """(verb, path template, body) of a rule and its additional bindings."""
    kind = rule.WhichOneof("pattern")
    if kind in _VERBS:
        yield kind.upper(), getattr(rule, kind), rule.body
    elif kind == "custom":
        yield rule.custom.kind.upper(), rule.custom.path, rule.body
    for extra in rule.additional_bindings:
        yield from _bindings(extra)


def routes_of(services: dict[ServiceDescriptor, object]) -> list[Route]:
    """Every annotated method of ``services`` (descriptor → servicer
    instance) as routes. Raises ``ValueError`` for a rule that names a path
    variable or body field the request message lacks, so a bad annotation
    fails at start, not at the first request."""
    routes: list[Route] = []
    for service, servicer in services.items():
        method: MethodDescriptor
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            request_type = message_factory.GetMessageClass(method.input_type)
            fields = method.input_type.fields_by_name
            for verb, template, body in _bindings(rule):
                pattern = _pattern(template)
                for name in pattern.groupindex:
                    if name not in fields:
                        raise ValueError(f"{method.full_name}: no field {name!r} in {template}")
                if body not in ("", "*") and body not in fields:
                    raise ValueError(f"{method.full_name}: no body field {body!r}")
                routes.append(
                    Route(
                        verb=verb,
                        template=template,
                        pattern=pattern,
                        body=body,
                        method=f"/{service.full_name}/{method.name}",
                        request_type=request_type,
                        streaming=method.server_streaming,
                        call=getattr(servicer, method.name),
                    )
                )
    return routes


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    def __init__(
        self, code: grpc.StatusCode, message: str, field: str = "", http_status: int = 0
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.http_status = http_status or HTTP_STATUS.get(code, 500)

    @classmethod
    def of(cls, exc: ConveyorError) -> ApiError:
        field = exc.field if isinstance(exc, InvalidArgument) else ""
        return cls(status_of(exc), str(exc), field)

    def response(self) -> web.Response:
        body: dict[str, str] = {"code": self.code.name, "message": self.message}
        if self.field:
            body["field"] = self.field
        return web.json_response(body, status=self.http_status)


def _bad(field: str, reason: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {reason}", field)


def _field_named(message: Message, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its JSON (lowerCamelCase) name."""
    desc = message.DESCRIPTOR
    # Typed as Any: the upb and pure-Python descriptor types differ in the stubs.
    found: Any = desc.fields_by_name.get(name)
    if found is None:
        found = next((f for f in desc.fields if f.json_name == name), None)
    return cast(FieldDescriptor | None, found)


def _scalar(field: FieldDescriptor, raw: str) -> object:
    """A query or path string as the JSON value the proto3 mapping takes
    for ``field``; raises ``ApiError`` naming the field."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        if raw in ("true", "1", ""):
            return True
        if raw in ("false", "0"):
            return False
        raise _bad(field.name, "must be true or false")
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        raise _bad(field.name, "cannot be given in the URL; send it in the JSON body")
    return raw


def _merge(message: Message, values: dict[str, object], where: str) -> None:
    """Set ``values`` (JSON names or proto names → JSON values) on
    ``message`` with the proto3 JSON mapping. Each field is parsed alone
    first, so an error names the field that is wrong."""
    for key, value in values.items():
        field = _field_named(message, key)
        if field is None:
            raise _bad(key, f"is not a field of {message.DESCRIPTOR.name} ({where})")
        scratch = type(message)()
        try:
            json_format.ParseDict({field.json_name: value}, scratch)
        except json_format.ParseError as exc:
            detail = str(exc).split(": ", 1)[-1].rstrip(".")
            raise _bad(field.name, f"has the wrong type or value ({detail})") from None
        except RecursionError:
            raise _bad(field.name, "is nested too deeply") from None
        message.ClearField(field.name)
        message.MergeFrom(scratch)


class Transcoder:
    """Serves ``routes`` under ``PREFIX``. ``cookie_auth``/``csrf_check``
    let a dashboard session call the API from its pages; without them only
    ``Authorization: Bearer`` is accepted."""

    def __init__(
        self,
        routes: list[Route],
        auth: Authenticator,
        metrics: ControlMetrics,
        *,
        cookie_auth: CookieAuth | None = None,
        csrf_check: CsrfCheck | None = None,
        max_body: int = 1 << 20,
        keepalive: float = KEEPALIVE_SECONDS,
    ) -> None:
        self.routes = routes
        self.auth = auth
        self.metrics = metrics
        self.cookie_auth = cookie_auth
        self.csrf_check = csrf_check
        self.max_body = max_body
        self.keepalive = keepalive

    def add_to(self, app: web.Application) -> None:
        """Mount the API on ``app``: one catch-all route, matched here."""
        app.router.add_route("*", PREFIX + "{tail:.*}", self.handle)

    def match(self, verb: str, path: str, wants_stream: bool) -> tuple[Route, dict[str, str]]:
        """The route for a request, and its path variables. Where a unary
        and a streaming method share a path, ``Accept: text/event-stream``
        picks the streaming one. Raises ``ApiError`` (404, or 405 when the
        path exists for other verbs)."""
        found: list[tuple[Route, dict[str, str]]] = []
        verbs: set[str] = set()
        for route in self.routes:
            m = route.pattern.match(path)
            if m is None:
                continue
            verbs.add(route.verb)
            if route.verb == verb:
                found.append((route, m.groupdict()))
        if not found:
            if verbs:
                raise ApiError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{verb} is not allowed on {path}; use {', '.join(sorted(verbs))}",
                    http_status=405,
                )
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"no API method at {verb} {path}")
        for route, params in found:
            if route.streaming == wants_stream:
                return route, params
        return found[0]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        began = time.perf_counter()
        wants_stream = "text/event-stream" in request.headers.get("Accept", "")
        name = "unknown"
        code = grpc.StatusCode.OK
        try:
            route, params = self.match(request.method, request.path, wants_stream)
            name = route.method.rsplit("/", 1)[-1]
            await self._authorize(request, route)
            message = await self._request_message(request, route, params)
            _bind_log_context(message, PRINCIPAL.get())
            if route.streaming:
                if not wants_stream:
                    raise ApiError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{name} streams: ask for it with Accept: text/event-stream",
                    )
                return await self._sse(request, route, message)
            reply = await route.call(message, None)
            return web.json_response(_to_json(reply), dumps=_dumps)
        except ApiError as exc:
            code = exc.code
            return exc.response()
        except ConveyorError as exc:
            error = ApiError.of(exc)
            code = error.code
            return error.response()
        except Exception:
            log.exception("unexpected failure in %s %s", request.method, request.path)
            code = grpc.StatusCode.INTERNAL
            return ApiError(code, "internal error; it was logged").response()
        finally:
            self.metrics.http_api_requests.labels(name, code.name).inc()
            self.metrics.http_api_seconds.labels(name).observe(time.perf_counter() - began)

    async def _authorize(self, request: web.Request, route: Route) -> None:
        """Authenticate before the body is read, so an anonymous request
        never costs the server its body's memory."""
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        who: Principal | None = None
        if token:
            who = await self.auth.resolve(token)
        elif self.cookie_auth is not None:
            who = await self.cookie_auth(request)
            if who is not None and request.method not in ("GET", "HEAD") and self.csrf_check:
                await self.csrf_check(request)
        if who is None and not token:
            raise Unauthenticated("missing or unknown token (Authorization: Bearer <token>)")
        BEARER.set(token)
        PRINCIPAL.set(_check(route.method, who, token))

    async def _request_message(
        self, request: web.Request, route: Route, params: dict[str, str]
    ) -> Message:
        message = route.request_type()
        if route.body:
            if request.content_length and request.content_length > self.max_body:
                raise ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the body is larger than {self.max_body} bytes",
                )
            # read(n) returns what has arrived, not n bytes: read to the end.
            parts: list[bytes] = []
            size = 0
            while size <= self.max_body:
                part = await request.content.read(self.max_body + 1 - size)
                if not part:
                    break
                parts.append(part)
                size += len(part)
            raw = b"".join(parts)
            if len(raw) > self.max_body:
                raise ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the body is larger than {self.max_body} bytes",
                )
            if raw.strip():
                try:
                    parsed = json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise _bad("body", f"is not valid JSON ({exc})") from None
                except RecursionError:
                    raise _bad("body", "is nested too deeply") from None
                if route.body == "*":
                    if not isinstance(parsed, dict):
                        raise _bad("body", "must be a JSON object")
                    _merge(message, parsed, "body")
                else:
                    _merge(message, {route.body: parsed}, "body")
        query: dict[str, object] = {}
        for key in request.query:
            values = request.query.getall(key)
            field = _field_named(message, key)
            if field is None:
                raise _bad(key, f"is not a parameter of {message.DESCRIPTOR.name}")
            if field.is_repeated:
                query[key] = [_scalar(field, v) for v in values]
            else:
                query[key] = _scalar(field, values[-1])
        _merge(message, query, "query")
        # Path variables win over the body and the query, as in grpc-gateway.
        path: dict[str, object] = {}
        for key, raw_value in params.items():
            field = _field_named(message, key)
            assert field is not None  # checked by routes_of
            path[key] = _scalar(field, raw_value)
        _merge(message, path, "path")
        resume = request.headers.get("Last-Event-ID")
        if resume is not None and _field_named(message, "cursor") is not None:
            _merge(message, {"cursor": resume}, "Last-Event-ID")
        return message

    async def _sse(
        self, request: web.Request, route: Route, message: Message
    ) -> web.StreamResponse:
        """Stream a server-streaming method as Server-Sent Events: each
        message is one event whose ``id`` is its ``cursor`` (when it has
        one), so a reconnect with ``Last-Event-ID`` resumes right after it;
        a comment line goes out every ``keepalive`` seconds of silence."""
        queue: asyncio.Queue[Message | BaseException | None] = asyncio.Queue(maxsize=16)

        async def pump() -> None:
            try:
                stream: AsyncIterator[Message] = route.call(message, None)
                async for item in stream:
                    await queue.put(item)
                await queue.put(None)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await queue.put(exc)

        producer, item = await self._first(queue, pump)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        # No gauge here: the servicer method behind the route (StreamLogs)
        # counts its own open calls, so an SSE follower counts once, as a
        # gRPC one does.
        try:
            await response.prepare(request)
            while item is not None:
                if isinstance(item, BaseException):
                    await response.write(_error_event(item))
                    break
                await response.write(_event(item))
                item = await self._next(queue, response)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            # The reader went away: stop following; the cursor it holds
            # resumes it later.
            pass
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        return response

    async def _next(
        self, queue: asyncio.Queue[Message | BaseException | None], response: web.StreamResponse
    ) -> Message | BaseException | None:
        """The stream's next item; a comment line goes out for every
        ``keepalive`` seconds it takes."""
        while True:
            try:
                async with asyncio.timeout(self.keepalive):
                    return await queue.get()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")

    async def _first(
        self,
        queue: asyncio.Queue[Message | BaseException | None],
        pump: Callable[[], Coroutine[Any, Any, None]],
    ) -> tuple[asyncio.Task[None], Message | BaseException | None]:
        """Start the stream and wait for its first item, so an error that
        comes before any event (not found, bad cursor) answers as a normal
        JSON error with its status instead of an event."""
        producer = asyncio.create_task(pump())
        try:
            item = await queue.get()
        except BaseException:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            raise
        if isinstance(item, ConveyorError):
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            raise item
        return producer, item


def _to_json(message: Message, *, defaults: bool = True) -> dict[str, Any]:
    """The proto3 JSON form. Responses spell out fields at their default
    value (a client sees every field); stream events leave them out, so an
    event holds only what it carries (a log page, or the final status)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=defaults)


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _event(message: Message) -> bytes:
    data = _dumps(_to_json(message, defaults=False))
    cursor = getattr(message, "cursor", "")
    head = f"id: {cursor}\n" if isinstance(cursor, str) and cursor else ""
    return f"{head}data: {data}\n\n".encode()


def _error_event(exc: BaseException) -> bytes:
    if isinstance(exc, ConveyorError):
        error = ApiError.of(exc)
    else:
        log.error("log stream failed", exc_info=exc)
        error = ApiError(grpc.StatusCode.INTERNAL, "internal error; it was logged")
    body = {"code": error.code.name, "message": error.message}
    return f"event: error\ndata: {_dumps(body)}\n\n".encode()
