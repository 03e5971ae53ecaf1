"""/ (the account's projects) and /projects/{name} (its builds, skipped
pushes, settings and variables; Trigger build)."""

from __future__ import annotations

from aiohttp import web

from control.domain.build import BuildStatus
from control.services.builds import TRIGGERS, BuildFilter
from control.services.registry import Services
from control.web.page import Renderer, form_of, signed_in

PAGE_SIZE = 25
SKIPPED_SHOWN = 20


class ProjectPages:
    def __init__(self, services: Services, renderer: Renderer) -> None:
        self.services = services
        self.renderer = renderer

    async def index(self, request: web.Request) -> web.StreamResponse:
        """GET /: each project with its newest build."""
        session = await signed_in(request)
        summaries = await self.services.projects.list(session.principal)
        return self.renderer.page("projects.html", session, summaries=summaries)

    async def show(self, request: web.Request) -> web.StreamResponse:
        """GET /projects/{name}?branch=&status=&trigger=&page=: builds
        newest first, filtered and paged by the service."""
        session = await signed_in(request)
        caller = session.principal
        project = await self.services.projects.get(caller, request.match_info["name"])
        filters = BuildFilter(
            branch=request.query.get("branch", "").strip(),
            status=request.query.get("status", ""),
            trigger=request.query.get("trigger", ""),
        )
        page_token = request.query.get("page", "")
        page = await self.services.builds.list(
            caller, project.id, filters=filters, limit=PAGE_SIZE, page_token=page_token
        )
        skipped = await self.services.builds.skipped(caller, project.id, SKIPPED_SHOWN)
        variables = await self.services.projects.env(caller, project.id)
        return self.renderer.page(
            "project.html",
            session,
            project=project,
            page=page,
            filters=filters,
            first_page=not page_token,
            statuses=[s.value for s in BuildStatus],
            triggers=sorted(TRIGGERS),
            skipped=skipped,
            variables=variables,
        )

    async def trigger(self, request: web.Request) -> web.StreamResponse:
        """POST /projects/{name}/trigger with ``branch`` (empty: the
        production branch): on to the new build's page."""
        session = await signed_in(request)
        form = await form_of(request, session)
        build = await self.services.builds.trigger(
            session.principal, request.match_info["name"], branch=form.get("branch", "").strip()
        )
        raise web.HTTPSeeOther(f"/builds/{build.id}")
