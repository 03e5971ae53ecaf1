"""Headers every HTTP answer of the control plane carries.

Set on ``on_response_prepare`` rather than in a middleware, so streamed
answers (Server-Sent Events, the raw log download) get them too.
"""

from __future__ import annotations

from aiohttp import web

# No inline script or style anywhere: every script is a module under
# /static and every style a class in the stylesheet. Pages may fetch and
# open event streams only to this origin, and no other page may frame them.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


async def add_security_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: add ``HEADERS`` (a handler's own value
    wins), HSTS over TLS, and no caching of pages that show account data."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if request.secure:
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if response.content_type == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")
