"""Cookie sessions of the dashboard, and the CSRF check of cookie requests.

The cookie holds a random session id (the database keeps its hash, see
``control.storage.sessions``); it is HttpOnly, SameSite=Strict, and Secure
with the ``__Host-`` prefix when the request came over TLS. The HTTP/JSON
API accepts the same cookie: it calls ``principal_of`` when a request has
no ``Authorization`` header, and ``check_csrf`` before any state change.
"""

from __future__ import annotations

import hmac
from datetime import timedelta
from urllib.parse import urlsplit

from aiohttp import web

from control.errors import PermissionDenied
from control.storage.accounts import Principal
from control.storage.sessions import SessionStore, WebSession

SESSION_TTL = timedelta(hours=12)
COOKIE = "conveyor_session"
# Browsers accept a __Host- cookie only when Secure, Path=/ and without
# Domain, so no subdomain or plain-HTTP page can plant or shadow it.
SECURE_COOKIE = "__Host-conveyor_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SESSIONS = web.AppKey("conveyor.web.sessions", SessionStore)


class _Lookup:
    """A request's session as looked up once (``found`` may be None)."""

    def __init__(self, found: WebSession | None) -> None:
        self.found = found


_LOOKED_UP = web.RequestKey("conveyor.web.session", _Lookup)


def cookie_name(request: web.BaseRequest) -> str:
    return SECURE_COOKIE if request.secure else COOKIE


async def session_of(request: web.Request) -> WebSession | None:
    """The request's live session, or None (no cookie, unknown, expired,
    or its token revoked). Looked up once per request. The application must
    have been set up by ``control.web.app.mount``."""
    if _LOOKED_UP in request:
        return request[_LOOKED_UP].found
    session_id = request.cookies.get(cookie_name(request), "")
    found = None
    # A well-formed id is 43 URL-safe characters; anything else is not ours.
    if 20 <= len(session_id) <= 64:
        found = await request.app[SESSIONS].get(session_id)
    request[_LOOKED_UP] = _Lookup(found)
    return found


async def principal_of(request: web.Request) -> Principal | None:
    """The principal of the request's session cookie, or None when there is
    no valid session. A state-changing request authenticated this way must
    also pass ``check_csrf``."""
    session = await session_of(request)
    return session.principal if session else None


def check_csrf(request: web.BaseRequest, session: WebSession, form_token: str = "") -> None:
    """Refuse a cookie-authenticated state change that did not come from
    the dashboard's own pages: raise ``PermissionDenied`` with a sentence
    unless the request's ``X-CSRF-Token`` header (fetch) or ``form_token``
    (the ``csrf_token`` field of a form, read by the caller) equals the
    session's token, and the browser says it came from this origin.
    Requests with a safe method (GET, HEAD, OPTIONS) always pass."""
    if request.method in SAFE_METHODS:
        return
    check_same_origin(request)
    sent = request.headers.get(CSRF_HEADER, "") or form_token
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
        raise PermissionDenied(
            "this request lacks the page's CSRF token; reload the page and try again"
        )


def check_same_origin(request: web.BaseRequest) -> None:
    """Raise ``PermissionDenied`` when the browser says the request came
    from another origin (``Sec-Fetch-Site`` or ``Origin``). Requests that
    carry neither header (older browsers, command-line clients) pass here
    and rely on the CSRF token or on having no cookie."""
    site = request.headers.get("Sec-Fetch-Site", "")
    if site and site not in ("same-origin", "none"):
        raise PermissionDenied("a request from another site was refused")
    origin = request.headers.get("Origin", "")
    # The host only: behind a proxy that ends TLS the request's own scheme
    # is http while the browser's origin is https.
    if origin and (origin == "null" or urlsplit(origin).netloc != request.host):
        raise PermissionDenied("a request from another origin was refused")


def set_session_cookie(request: web.BaseRequest, response: web.StreamResponse, value: str) -> None:
    """Put the session cookie on ``response`` (see the module docstring)."""
    response.set_cookie(
        cookie_name(request),
        value,
        max_age=int(SESSION_TTL.total_seconds()),
        path="/",
        httponly=True,
        secure=request.secure,
        samesite="Strict",
    )


def clear_session_cookie(request: web.BaseRequest, response: web.StreamResponse) -> None:
    response.del_cookie(
        cookie_name(request), path="/", secure=request.secure, httponly=True, samesite="Strict"
    )


async def require_csrf(request: web.Request) -> None:
    """``check_csrf`` for the HTTP/JSON API, whose fetches send the token in
    the ``X-CSRF-Token`` header: raise ``PermissionDenied`` unless the
    request's session sent its token from this origin. Call it only for a
    request ``principal_of`` authenticated."""
    session = await session_of(request)
    if session is None:
        raise PermissionDenied("this request has no dashboard session")
    check_csrf(request, session)
