"""Sign-in, sessions and the page-level defences, in a real browser: no
token in a URL or page, cookie flags, no open redirect, revoked tokens end
sessions, another account's build is 404, cross-site and token-less POSTs
are refused, failed sign-ins are rate limited, strict headers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest_asyncio
from aiohttp import web
from playwright.async_api import Browser, expect

from control.storage.accounts import insert_token, revoke_token
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner
from tests.security.test_tls import self_signed
from tests.web.conftest import Dashboard, Tenant, new_tenant


@pytest_asyncio.fixture
async def running_build(
    writer_api: Api, proto_runner: ProtocolRunner, repo: Path
) -> AsyncIterator[str]:
    """A build of the writer's account that a runner holds, running."""
    await writer_api.create_project("web", repo)
    build = await writer_api.trigger("web")
    assignment = await proto_runner.next_assignment()
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    yield build.id


async def test_sign_in_session_and_sign_out(
    control: ControlHandle, dashboard: Dashboard, writer: Tenant
) -> None:
    page = dashboard.page
    response = await page.goto(dashboard.url + "/runners")
    assert response is not None
    assert page.url.startswith(dashboard.url + "/login?next=")

    # A wrong token: 401, a sentence, and the token appears nowhere.
    await page.fill("input[name=token]", "cvy_wrong-token-value")
    async with page.expect_response(lambda r: r.url.endswith("/login")) as answer:
        await page.click("button[type=submit]")
    assert (await answer.value).status == 401
    await expect(page.locator(".error")).to_contain_text("not a valid")
    assert "cvy_wrong-token-value" not in await page.content()
    assert "/login" in page.url
    assert "token" not in page.url

    # The right one goes back where the reader was going.
    await page.fill("input[name=token]", writer.token)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(dashboard.url + "/runners")
    assert writer.token not in await page.content()
    assert all(writer.token not in url for url in dashboard.requests)
    cookie = await dashboard.cookie()
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # plain HTTP here; __Host- and Secure over TLS
    assert writer.token not in str(cookie["value"])
    assert await page.evaluate("document.cookie") == ""

    # Sign out ends the session server-side, not only in this browser.
    await page.click("text=Sign out")
    await expect(page).to_have_url(dashboard.url + "/login")
    await page.goto(dashboard.url + "/")
    await expect(page).to_have_url(re.compile(r"/login\?next=(%2F|/)$"))


async def test_no_open_redirect_and_revoked_token_ends_session(
    control: ControlHandle, dashboard: Dashboard, writer: Tenant
) -> None:
    page = dashboard.page
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        await dashboard.context.clear_cookies()
        await page.goto(dashboard.url + "/login?next=" + target)
        await page.fill("input[name=token]", writer.token)
        await page.click("button[type=submit]")
        await expect(page).to_have_url(dashboard.url + "/")

    async with control.plane.db.transaction() as conn:
        await revoke_token(conn, writer.account_id, writer.token_id)
    await page.goto(dashboard.url + "/runners")
    await expect(page).to_have_url(re.compile(r"/login\?next=(%2F|/)runners$"))


async def test_another_accounts_build_is_not_found(
    control: ControlHandle, dashboard: Dashboard, writer: Tenant, running_build: str
) -> None:
    stranger = await new_tenant(control, "other", ("admin",))
    await dashboard.sign_in(stranger.token)
    for path in (f"/builds/{running_build}", f"/builds/{running_build}/log.txt"):
        response = await dashboard.page.goto(dashboard.url + path)
        assert response is not None
        assert response.status == 404, path
    response = await dashboard.page.goto(dashboard.url + "/projects/web")
    assert response is not None
    assert response.status == 404
    # The API answers the same for a cookie session.
    status = await dashboard.page.evaluate(
        "id => fetch(`/api/v1/builds/${id}`).then(r => r.status)", running_build
    )
    assert status == 404

    # A read-only token of the owning account sees the build, without
    # Cancel; a cancel it posts anyway (with the CSRF token) is refused.
    async with control.plane.db.transaction() as conn:
        _, reader = await insert_token(conn, writer.account_id, "reader", "user", ("read",))
    await dashboard.context.clear_cookies()
    await dashboard.sign_in(reader, f"/builds/{running_build}")
    await expect(dashboard.page.locator("#summary .badge")).to_have_text("running")
    assert await dashboard.page.locator("#cancel").count() == 0
    status = await dashboard.page.evaluate(
        """async id => (await fetch(`/builds/${id}/cancel`, {
          method: "POST",
          body: new URLSearchParams({csrf_token:
            document.querySelector("meta[name=csrf-token]").content}),
        })).status""",
        running_build,
    )
    assert status == 403


async def test_state_changes_need_the_csrf_token(
    control: ControlHandle,
    dashboard: Dashboard,
    writer: Tenant,
    writer_api: Api,
    running_build: str,
) -> None:
    page = dashboard.page
    await dashboard.sign_in(writer.token, f"/builds/{running_build}")
    await expect(page.locator("#summary .badge")).to_have_text("running")

    # Another origin's page posting a form at the dashboard (the browser
    # still sends the cookie: 127.0.0.1 on another port is the same site).
    evil = web.Application()
    target = f"{dashboard.url}/builds/{running_build}/cancel"

    async def attack(request: web.Request) -> web.Response:
        return web.Response(
            content_type="text/html",
            text=f'<form method="post" action="{target}"><button id="go">win</button></form>',
        )

    evil.router.add_get("/", attack)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        await page.goto(f"http://127.0.0.1:{port}/")
        async with page.expect_response(target) as answer:
            await page.click("#go")
        assert (await answer.value).status == 403
    finally:
        await runner.cleanup()

    # Same origin but without the token: refused too, on the page and the API.
    await page.goto(f"{dashboard.url}/builds/{running_build}")
    statuses = await page.evaluate(
        """async id => [
          (await fetch(`/builds/${id}/cancel`, {method: "POST"})).status,
          (await fetch(`/api/v1/builds/${id}:cancel`, {method: "POST"})).status,
        ]""",
        running_build,
    )
    assert statuses == [403, 403]
    assert (await writer_api.get(running_build)).status == pb.BUILD_STATUS_RUNNING

    # With the page's token the API accepts the session.
    status = await page.evaluate(
        """async id => (await fetch(`/api/v1/builds/${id}:cancel`, {
          method: "POST",
          headers: {"X-CSRF-Token": document.querySelector("meta[name=csrf-token]").content},
        })).status""",
        running_build,
    )
    assert status == 200


async def test_failed_sign_ins_are_rate_limited_and_headers_are_strict(
    control: ControlHandle, dashboard: Dashboard, writer: Tenant
) -> None:
    url = dashboard.url
    async with aiohttp.ClientSession() as http:
        codes = []
        for _ in range(6):
            async with http.post(url + "/login", data={"token": "cvy_guess"}) as r:
                codes.append(r.status)
        assert codes == [401] * 5 + [429]
        # Even the right token waits until the window has passed.
        async with http.post(url + "/login", data={"token": writer.token}) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) > 0

        async with http.get(url + "/login") as r:
            page_headers = r.headers
            html = await r.text()
        assert "script-src 'self'" in page_headers["Content-Security-Policy"]
        assert "unsafe-inline" not in page_headers["Content-Security-Policy"]
        assert page_headers["X-Frame-Options"] == "DENY"
        assert page_headers["X-Content-Type-Options"] == "nosniff"
        assert page_headers["Referrer-Policy"] == "same-origin"
        assert page_headers["Cache-Control"] == "no-store"
        css = html.split('rel="stylesheet" href="', 1)[1].split('"', 1)[0]
        async with http.get(url + css) as r:
            assert r.status == 200
            assert r.headers["Cache-Control"].endswith("immutable")
            etag = r.headers["ETag"]
        async with http.get(url + css, headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        stale = css.split("/")
        stale[2] = "0" * len(stale[2])
        async with http.get(url + "/".join(stale)) as r:
            assert r.status == 404


async def test_over_tls_the_cookie_is_secure_and_host_only(
    database_url: str, tmp_path: Path, browser: Browser
) -> None:
    cert, key = self_signed(tmp_path)
    handle = ControlHandle(database_url)
    handle.plane.settings = handle.settings = handle.settings.with_(
        tls_cert=str(cert), tls_key=str(key)
    )
    await handle.start()
    context = await browser.new_context(ignore_https_errors=True)
    try:
        tenant = await new_tenant(handle, "tls", ("read",))
        dashboard = Dashboard(handle, context, await context.new_page())
        assert dashboard.url.startswith("https://")
        await dashboard.sign_in(tenant.token, "/runners")
        await expect(dashboard.page.locator("h1")).to_have_text("Runners")
        cookie = await dashboard.cookie()
        assert cookie["name"] == "__Host-conveyor_session"
        assert cookie["secure"] is True
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        response = await dashboard.page.goto(dashboard.url + "/")
        assert response is not None
        assert "max-age" in (await response.all_headers())["strict-transport-security"]
    finally:
        await context.close()
        await handle.stop()
