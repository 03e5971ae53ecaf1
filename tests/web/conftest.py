"""Browser fixtures: one headless Chromium (Debian's) for the test session,
a fresh browser context per test, and a signed-in dashboard on a real
control plane."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from control.storage.accounts import create_account, insert_token
from tests.helpers import Api, ControlHandle, ProtocolRunner

CHROMIUM = Path(os.environ.get("CONVEYOR_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# CONVEYOR_SCREENSHOTS=1 makes the tests refresh docs/screenshots/.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: scripts/bootstrap installs Debian's chromium",
        allow_module_level=True,
    )

from playwright.async_api import Browser, BrowserContext, Page, async_playwright  # noqa: E402


@pytest_asyncio.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One Chromium for every browser test (starting one costs about a
    second); each test gets its own context, so cookies never leak."""
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Tenant:
    """An account with a write-scoped user token."""

    account_id: str
    token_id: str
    token: str


async def new_tenant(control: ControlHandle, name: str, scopes: tuple[str, ...]) -> Tenant:
    async with control.plane.db.transaction() as conn:
        account = await create_account(conn, f"{name}-{uuid.uuid4().hex[:6]}", 6)
        token_id, token = await insert_token(conn, account.id, f"{name}-token", "user", scopes)
    return Tenant(account.id, token_id, token)


class Dashboard:
    """A browser context on ``control``'s dashboard, with a helper to sign
    in through the real form and a collector of CSP violations."""

    def __init__(self, control: ControlHandle, context: BrowserContext, page: Page) -> None:
        self.control = control
        self.context = context
        self.page = page
        self.url = control.http_url
        self.console_errors: list[str] = []
        self.requests: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on(
            "console",
            lambda msg: self.console_errors.append(msg.text) if msg.type == "error" else None,
        )
        page.on("pageerror", lambda exc: self.console_errors.append(str(exc)))

    async def sign_in(self, token: str, path: str = "/") -> None:
        await self.page.goto(self.url + path)
        await self.page.fill("input[name=token]", token)
        await self.page.click("button[type=submit]")
        await self.page.wait_for_load_state()

    async def screenshot(self, name: str, *, full_page: bool = False) -> None:
        """Keep a picture of the page in docs/screenshots/ when asked to
        (CONVEYOR_SCREENSHOTS=1), so a test run leaves the tree as it was."""
        if os.environ.get("CONVEYOR_SCREENSHOTS"):
            await self.page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page)

    async def cookie(self) -> dict[str, object]:
        found = [c for c in await self.context.cookies() if "conveyor_session" in c["name"]]
        assert len(found) == 1, found
        return dict(found[0])


@pytest_asyncio.fixture
async def dashboard(control: ControlHandle, browser: Browser) -> AsyncIterator[Dashboard]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    page = await context.new_page()
    try:
        yield Dashboard(control, context, page)
    finally:
        await context.close()


@pytest_asyncio.fixture
async def writer(control: ControlHandle) -> Tenant:
    """An account with a read/write token (the admin token's account is the
    default one; pages must work for any account)."""
    return await new_tenant(control, "acme", ("write",))


@pytest_asyncio.fixture
async def writer_api(control: ControlHandle, writer: Tenant) -> AsyncIterator[Api]:
    client = Api(control.plane.grpc_address, writer.token)
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture
async def live_runner(proto_runner: ProtocolRunner) -> AsyncIterator[ProtocolRunner]:
    """The protocol runner, heartbeating so it outlives the tests' fast
    lost-runner deadline while a browser looks at it."""

    async def beat() -> None:
        while True:
            proto_runner.heartbeat(busy=0)
            await asyncio.sleep(0.5)

    task = asyncio.create_task(beat())
    try:
        yield proto_runner
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
