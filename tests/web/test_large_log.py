"""A build with a 1,000,000-line log opens fast with its last line in view;
earlier ranges load on demand; a link to an early line shows that line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.helpers import Api, ControlHandle
from tests.web.conftest import Dashboard, Tenant

LINES = 1_000_000
BATCH = 5_000  # the runner's largest batch
DASH = "\N{EN DASH}"


async def store_log(control: ControlHandle, build_id: str) -> None:
    """Append the lines through the LogStore's ingest path, batch by batch,
    as the runner service would."""
    now_ms = int(time.time() * 1000)
    for seq, first in enumerate(range(1, LINES + 1, BATCH), start=1):
        packed = "\n".join(
            f"{now_ms}\to\tstep {n}: \x1b[32mok\x1b[0m compiling module_{n % 977}.py"
            for n in range(first, first + BATCH)
        )
        await control.plane.logs.append_packed(build_id, seq, packed, BATCH)


@pytest.mark.timing
async def test_million_line_log_opens_at_its_tail(
    control: ControlHandle, dashboard: Dashboard, writer: Tenant, writer_api: Api, repo: Path
) -> None:
    await writer_api.create_project("big", repo)
    build = await writer_api.trigger("big")
    await writer_api.cancel(build.id)  # queued, so final at once; the log is what matters
    await store_log(control, build.id)
    page = dashboard.page
    await dashboard.sign_in(writer.token)

    # Bound: the issue asks for under 2 s on this 2-core machine; the page
    # is one SQL read of the last chunk plus 1,000 rendered lines.
    began = time.perf_counter()
    await page.goto(f"{dashboard.url}/builds/{build.id}")
    last = page.locator(f"#L{LINES}")
    await expect(last).to_be_visible()
    assert await page.locator("#log").evaluate(
        "e => e.scrollTop + e.clientHeight >= e.scrollHeight - 8"
    )
    elapsed = time.perf_counter() - began
    print(f"1,000,000-line log: last line visible {elapsed:.3f} s after navigation")
    assert elapsed < 2.0
    assert await page.locator("#log .line").count() == 1000
    count = page.locator("#log-count")
    await expect(count).to_have_text(f"lines 999,001{DASH}1,000,000 of 1,000,000")
    await dashboard.screenshot("build-log-1m.png")

    # Earlier lines on demand, keeping the reader's place.
    await page.click("#log-earlier")
    await expect(count).to_have_text(f"lines 997,001{DASH}1,000,000 of 1,000,000")
    await expect(page.locator("#L997001")).to_contain_text("step 997001: ok")

    # A link to line 123 shows it, without loading the 999,877 lines after it.
    await page.goto(f"{dashboard.url}/builds/{build.id}#L123")
    await expect(page.locator("#L123")).to_be_in_viewport()
    await expect(page.locator("#L123 .ansi-green-fg")).to_have_text("ok")
    assert await page.locator("#log .line").count() <= 3000
    await page.click("#log-later")
    await expect(page.locator("#L2123")).to_be_attached()

    # The raw download streams the whole log.
    raw = await page.evaluate(
        "id => fetch(`/builds/${id}/log.txt`).then(r => r.text()).then(t => t.length)",
        build.id,
    )
    assert raw > LINES * 30
