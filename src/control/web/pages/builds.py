"""/builds/{id}: one build, its steps and its log; Cancel and Retry.

The page carries only the log's last ``TAIL`` lines; the browser asks for
earlier ranges (``lines``) when the reader wants them and follows new lines
over the API's event stream, so a million-line log costs the server one
small page. ``raw`` streams the whole log as text, page by page.
"""

from __future__ import annotations

from aiohttp import web

from control.domain import cursor
from control.errors import InvalidArgument
from control.services.builds import MAX_LOG_LINES
from control.services.registry import Services
from control.storage.logs import StoredLine
from control.web.page import REFRESH_HEADER, Renderer, form_of, signed_in

# Lines the page starts with, and at most per range the browser asks for.
TAIL = 1000
MAX_RANGE = 5000
STREAM_CODES = {"stdout": "o", "stderr": "e", "system": "s"}


def packed(lines: list[StoredLine]) -> list[tuple[int, str, str]]:
    """Lines as the browser takes them: [number, stream letter, text]."""
    return [(ln.number, STREAM_CODES.get(ln.stream, "o"), ln.text) for ln in lines]


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidArgument(name, f"must be a whole number from {low} to {high}")
    return int(raw)


class BuildPage:
    def __init__(self, services: Services, renderer: Renderer) -> None:
        self.services = services
        self.renderer = renderer

    async def show(self, request: web.Request) -> web.StreamResponse:
        """GET /builds/{build_id}: 404 for a build of another account."""
        session = await signed_in(request)
        caller = session.principal
        build_id = request.match_info["build_id"]
        build = await self.services.builds.get(caller, build_id)
        log: dict[str, object] | None = None
        if REFRESH_HEADER not in request.headers:
            tail = await self.services.builds.log_tail(caller, build.id, TAIL)
            last = tail[-1].number if tail else 0
            log = {
                "build": build.id,
                "first": tail[0].number if tail else 1,
                "last": last,
                "cursor": cursor.encode(last),
                "final": build.status.final,
                "lines": packed(tail),
            }
        return self.renderer.page("build.html", session, build=build, log=log)

    async def lines(self, request: web.Request) -> web.StreamResponse:
        """GET /builds/{build_id}/lines?after=N&limit=M: up to M stored lines
        numbered after N, as JSON ``{"lines": [[number, stream, text]...]}``."""
        session = await signed_in(request)
        after = _int(request, "after", 0, 0, 10**15)
        limit = _int(request, "limit", 1000, 1, MAX_RANGE)
        found = await self.services.builds.log_lines(
            session.principal, request.match_info["build_id"], after, limit
        )
        return web.json_response({"lines": packed(found)}, headers={"Cache-Control": "no-store"})

    async def raw(self, request: web.Request) -> web.StreamResponse:
        """GET /builds/{build_id}/log.txt: the whole log as plain text, read
        and sent ``MAX_LOG_LINES`` at a time."""
        session = await signed_in(request)
        caller = session.principal
        build = await self.services.builds.get(caller, request.match_info["build_id"])
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/plain; charset=utf-8",
                "Content-Disposition": f'attachment; filename="build-{build.id}.log"',
                "Cache-Control": "no-store",
            }
        )
        await response.prepare(request)
        after = 0
        while True:
            found = await self.services.builds.log_lines(caller, build.id, after, MAX_LOG_LINES)
            if not found:
                break
            await response.write("".join(ln.text + "\n" for ln in found).encode())
            after = found[-1].number
        await response.write_eof()
        return response

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """POST /builds/{build_id}/cancel (form with the CSRF token)."""
        session = await signed_in(request)
        await form_of(request, session)
        build = await self.services.builds.cancel(session.principal, request.match_info["build_id"])
        raise web.HTTPSeeOther(f"/builds/{build.id}")

    async def retry(self, request: web.Request) -> web.StreamResponse:
        """POST /builds/{build_id}/retry (form with the CSRF token): on to
        the new build's page."""
        session = await signed_in(request)
        await form_of(request, session)
        build = await self.services.builds.retry(session.principal, request.match_info["build_id"])
        raise web.HTTPSeeOther(f"/builds/{build.id}")
