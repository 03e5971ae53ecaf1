"""The build page in a real browser: the log follows live over the API's
event stream, ANSI colours become styled spans, hostile text stays text,
Cancel and Retry work from the page."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from playwright.async_api import expect

from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner
from tests.web.conftest import SCREENSHOTS, Dashboard, Tenant

HOSTILE = "<img src=x onerror=alert(1)>"


async def test_running_build_log_is_live_and_controllable(
    control: ControlHandle,
    dashboard: Dashboard,
    writer: Tenant,
    writer_api: Api,
    proto_runner: ProtocolRunner,
    repo: Path,
) -> None:
    await writer_api.create_project("web", repo)
    build = await writer_api.trigger("web")
    assignment = await proto_runner.next_assignment()
    assert assignment.build_id == build.id
    await proto_runner.report(assignment, pb.BUILD_STATUS_RUNNING)
    beat = asyncio.create_task(heartbeats(proto_runner))
    await proto_runner.append(
        assignment,
        1,
        ["$ make", "\x1b[31mred alert\x1b[0m plain", "\x1b[1;32mbold green\x1b[0m", HOSTILE],
    )

    page = dashboard.page
    await dashboard.sign_in(writer.token, f"/builds/{build.id}")
    assert page.url.endswith(f"/builds/{build.id}")
    log = page.locator("#log")
    await expect(log.locator("#L4")).to_contain_text(HOSTILE)
    # ANSI colours are classes of spans, not escape characters or markup.
    await expect(log.locator("#L2 span.ansi-red-fg")).to_have_text("red alert")
    await expect(log.locator("#L3 span.ansi-green-fg.ansi-bold")).to_have_text("bold green")
    assert "\x1b" not in await log.inner_text()
    assert await log.locator("img").count() == 0
    await expect(page.locator("#summary .badge")).to_have_text("running")

    # New lines arrive without a reload, and the view follows them.
    await proto_runner.append(assignment, 2, [f"live {i}" for i in range(1, 201)])
    await expect(log.locator("#L204")).to_have_text(re.compile(r"204\s*live 200"))
    await log.locator("#L204").wait_for()
    assert await log.evaluate("e => e.scrollTop + e.clientHeight >= e.scrollHeight - 8")
    # They came over the API's event stream, not by polling the page's
    # range endpoint.
    assert [u for u in dashboard.requests if "/logs?follow=true" in u]
    assert not [u for u in dashboard.requests if "/lines?" in u]
    await page.screenshot(path=str(SCREENSHOTS / "build-running.png"))

    # Cancel from the page: the runner is told, and its report flips the page.
    await page.click("#cancel")
    cancel = await proto_runner.cancels.get()
    assert cancel.build_id == build.id
    await proto_runner.report(assignment, pb.BUILD_STATUS_CANCELED, reason="stopped")
    await expect(page.locator("#summary .badge")).to_have_text("canceled", timeout=8000)
    await expect(page.locator("#summary .reason")).to_contain_text("canceled by acme-token")

    # Retry opens the new build's page.
    await page.click("#retry")
    await expect(page).not_to_have_url(re.compile(f"/builds/{build.id}$"))
    retried = page.url.rsplit("/", 1)[-1]
    assert (await writer_api.get(retried)).retry_of == build.id
    await expect(page.locator("#summary")).to_contain_text("retry")
    assert not [e for e in dashboard.console_errors if "Content Security Policy" in e]
    beat.cancel()


async def heartbeats(runner: ProtocolRunner) -> None:
    """Keep the protocol runner alive past the fast lost-runner deadline."""
    while True:
        runner.heartbeat(busy=1)
        await asyncio.sleep(0.5)
