"""What every page handler shares: the signed-in session, rendering, and
turning the error tree into an error page."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import jinja2
from aiohttp import web

from control.errors import (
    ConveyorError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from control.services.access import may
from control.storage.sessions import WebSession
from control.web.sessions import CSRF_FIELD, check_csrf, session_of
from control.web.static_files import StaticFiles

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATUS_OF: tuple[tuple[type[ConveyorError], int], ...] = (
    (NotFound, 404),
    (PermissionDenied, 403),
    (Unauthenticated, 401),
    (InvalidArgument, 400),
    (FailedPrecondition, 409),
    (Unavailable, 503),
)
# Asked by live.js when it refreshes the live parts of a page: the handler
# may leave out what those parts do not need (the log of a build page).
REFRESH_HEADER = "X-Conveyor-Refresh"


class Renderer:
    """Renders templates with what every page needs (static URLs, the
    session, its CSRF token, whether it may write)."""

    def __init__(self, env: jinja2.Environment, static: StaticFiles) -> None:
        self.env = env
        self.static = static

    def page(
        self,
        template: str,
        session: WebSession | None,
        *,
        status: int = 200,
        **context: Any,
    ) -> web.Response:
        body = self.env.get_template(template).render(
            static=self.static.url,
            session=session,
            can_write=bool(session and may(session.principal, "write")),
            csrf_field=CSRF_FIELD,
            **context,
        )
        return web.Response(text=body, status=status, content_type="text/html")


async def signed_in(request: web.Request) -> WebSession:
    """The request's session; without one, send a GET to the sign-in page
    (which returns here afterwards) and refuse anything else with 401."""
    session = await session_of(request)
    if session is not None:
        return session
    if request.method == "GET":
        raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='')}")
    raise Unauthenticated("sign in first")


async def form_of(request: web.Request, session: WebSession) -> dict[str, str]:
    """The posted form of a state change, after ``check_csrf`` let it pass;
    raises ``PermissionDenied`` otherwise."""
    form = await request.post()
    token = form.get(CSRF_FIELD, "")
    check_csrf(request, session, token if isinstance(token, str) else "")
    return {k: v for k, v in form.items() if isinstance(v, str)}


def handled(renderer: Renderer, handler: Handler) -> Handler:
    """Wrap a page handler so the error tree becomes an error page with the
    error's sentence (never a stack trace) and the matching status."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConveyorError as exc:
            status = next((code for kind, code in STATUS_OF if isinstance(exc, kind)), 500)
            if status == 500:
                log.exception("page %s failed", request.path)
            session = await session_of(request)
            return renderer.page(
                "error.html", session, status=status, code=status, message=str(exc)
            )

    return wrapper
