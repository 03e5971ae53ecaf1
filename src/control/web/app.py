"""Mounting the dashboard on the control plane's aiohttp application."""

from __future__ import annotations

from aiohttp import web

from control.services.registry import Services
from control.storage.db import Database
from control.storage.sessions import SessionStore
from control.web import templating
from control.web.login import Login
from control.web.page import Handler, Renderer, handled
from control.web.pages.builds import BuildPage
from control.web.pages.projects import ProjectPages
from control.web.pages.runners import RunnersPage
from control.web.security_headers import add_security_headers
from control.web.sessions import SESSIONS
from control.web.static_files import StaticFiles
from control.web.throttle import FailureThrottle


def mount(
    app: web.Application,
    services: Services,
    db: Database,
    throttle: FailureThrottle | None = None,
) -> None:
    """Add the pages, sign-in, static files and security headers to ``app``
    (before it starts). Sets ``app[SESSIONS]``, which
    ``control.web.sessions.principal_of`` needs."""
    static = StaticFiles()
    renderer = Renderer(templating.environment(), static)
    sessions = SessionStore(db)
    app[SESSIONS] = sessions
    app.on_response_prepare.append(add_security_headers)

    login = Login(sessions, renderer, throttle or FailureThrottle())
    projects = ProjectPages(services, renderer)
    builds = BuildPage(services, renderer)
    runners = RunnersPage(services, renderer)

    def page(handler: Handler) -> Handler:
        return handled(renderer, handler)

    r = app.router
    r.add_get("/login", page(login.form))
    r.add_post("/login", page(login.submit))
    r.add_post("/logout", page(login.logout))
    r.add_get("/", page(projects.index))
    r.add_get("/projects/{name}", page(projects.show))
    r.add_post("/projects/{name}/trigger", page(projects.trigger))
    r.add_get("/builds/{build_id}", page(builds.show))
    r.add_get("/builds/{build_id}/lines", page(builds.lines))
    r.add_get("/builds/{build_id}/log.txt", page(builds.raw))
    r.add_post("/builds/{build_id}/cancel", page(builds.cancel))
    r.add_post("/builds/{build_id}/retry", page(builds.retry))
    r.add_get("/runners", page(runners.show))
    r.add_get("/static/{version}/{path:.+}", static.serve)
