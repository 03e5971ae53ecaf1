"""Signing in with an API token and signing out.

The token travels only in a POSTed form body; it is never put in a URL, a
page or a log. A good token opens a server-side session (see
``control.storage.sessions``) and the browser goes back to the local path it
came from. Failed attempts are rate limited per client address.
"""

from __future__ import annotations

import logging
import math
from urllib.parse import urlsplit

from aiohttp import web

from control.errors import PermissionDenied
from control.storage.sessions import SessionStore
from control.web.page import Renderer, form_of
from control.web.sessions import (
    SESSION_TTL,
    check_same_origin,
    clear_session_cookie,
    cookie_name,
    session_of,
    set_session_cookie,
)
from control.web.throttle import FailureThrottle

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 200


def local_path(target: str) -> str:
    """``target`` when it is a path on this site ("/builds/..."), else "/".
    Refuses scheme-relative ("//host"), backslash and absolute URLs, so the
    sign-in page cannot be used to send someone elsewhere."""
    if (
        not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or len(target) > 2000
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in target)
    ):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


class Login:
    def __init__(
        self, sessions: SessionStore, renderer: Renderer, throttle: FailureThrottle
    ) -> None:
        self.sessions = sessions
        self.renderer = renderer
        self.throttle = throttle

    async def form(self, request: web.Request) -> web.StreamResponse:
        """GET /login?next=/path: the form, or straight on when signed in."""
        target = local_path(request.query.get("next", "/"))
        if await session_of(request) is not None:
            raise web.HTTPSeeOther(target)
        return self.renderer.page("login.html", None, next=target, error="")

    async def submit(self, request: web.Request) -> web.StreamResponse:
        """POST /login with ``token`` and ``next``: 303 to ``next`` with the
        session cookie; 401 with the form again for a wrong token; 429 while
        the client is over its failure limit; 403 from another site."""
        try:
            check_same_origin(request)
        except PermissionDenied as exc:
            return self.renderer.page("login.html", None, status=403, next="/", error=str(exc))
        client = request.remote or "unknown"
        form = await request.post()
        raw_next = form.get("next", "/")
        target = local_path(raw_next if isinstance(raw_next, str) else "/")
        wait = self.throttle.blocked(client)
        if wait > 0:
            response = self.renderer.page(
                "login.html",
                None,
                status=429,
                next=target,
                error=f"Too many failed sign-ins; try again in {math.ceil(wait)} s.",
            )
            response.headers["Retry-After"] = str(math.ceil(wait))
            return response
        token = form.get("token", "")
        opened = None
        if isinstance(token, str) and 0 < len(token.strip()) <= MAX_TOKEN_CHARS:
            opened = await self.sessions.open(token.strip(), SESSION_TTL)
        if opened is None:
            self.throttle.failed(client)
            log.info("dashboard sign-in refused for %s", client)
            return self.renderer.page(
                "login.html",
                None,
                status=401,
                next=target,
                error="That token is not a valid, unrevoked API token of an account.",
            )
        session_id, session = opened
        log.info("dashboard sign-in as %s", session.principal.name)
        response = web.HTTPSeeOther(target)
        set_session_cookie(request, response, session_id)
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """POST /logout (with the CSRF token): end the session, back to the
        sign-in page. Without a session it only clears the cookie."""
        session = await session_of(request)
        if session is not None:
            await form_of(request, session)
            await self.sessions.close(request.cookies.get(cookie_name(request), ""))
        response = web.HTTPSeeOther("/login")
        clear_session_cookie(request, response)
        raise response
