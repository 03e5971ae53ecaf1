"""/runners: the installation's runners and the account's queue."""

from __future__ import annotations

from aiohttp import web

from control.services.registry import Services
from control.web.page import Renderer, signed_in


class RunnersPage:
    def __init__(self, services: Services, renderer: Renderer) -> None:
        self.services = services
        self.renderer = renderer

    async def show(self, request: web.Request) -> web.StreamResponse:
        session = await signed_in(request)
        runners = await self.services.runners.list(session.principal)
        queue = await self.services.runners.queue(session.principal)
        return self.renderer.page("runners.html", session, runners=runners, queue=queue)
