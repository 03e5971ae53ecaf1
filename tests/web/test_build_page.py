"""The build page in a real browser: the log follows live over the API's
event stream, ANSI colours become styled spans, hostile text stays text,
steps open and close by status, Cancel and Retry work from the page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.async_api import expect

from conveyor.v1 import runner_service_pb2 as rs
from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner
from tests.web.conftest import Dashboard, Tenant

HOSTILE = "<img src=x onerror=alert(1)>"


def step(index: int, name: str, status: int, exit_code: int | None = None) -> Any:
    return rs.StepUpdate(
        index=index,
        name=name,
        status=status,
        exit_code=exit_code or 0,
        has_exit_code=exit_code is not None,
    )


async def test_running_build_log_is_live_and_controllable(
    control: ControlHandle,
    dashboard: Dashboard,
    writer: Tenant,
    writer_api: Api,
    live_runner: ProtocolRunner,
    repo: Path,
) -> None:
    await writer_api.create_project("web", repo)
    build = await writer_api.trigger("web")
    assignment = await live_runner.next_assignment()
    assert assignment.build_id == build.id
    await live_runner.report(
        assignment,
        pb.BUILD_STATUS_RUNNING,
        steps=[
            step(0, "clone", pb.STEP_STATUS_SUCCEEDED, 0),
            step(1, "build", pb.STEP_STATUS_RUNNING),
        ],
    )
    await live_runner.append(
        assignment,
        1,
        ["$ make test", "\x1b[31mred alert\x1b[0m plain", "\x1b[1;32mbold green\x1b[0m", HOSTILE],
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
    # A finished successful step is collapsed, the running one open.
    await expect(page.locator("#step-0")).not_to_have_attribute("open", "")
    await expect(page.locator("#step-1")).to_have_attribute("open", "")

    # New lines arrive without a reload, and the view follows them.
    await live_runner.append(
        assignment,
        2,
        [
            f"\x1b[32m✓\x1b[0m tests/test_module_{i:03}.py::test_case passed in 0.0{i % 10} s"
            for i in range(1, 201)
        ],
    )
    await expect(log.locator("#L204")).to_contain_text("test_module_200")
    assert await log.evaluate("e => e.scrollTop + e.clientHeight >= e.scrollHeight - 8")
    # They came over the API's event stream, not by polling the page's
    # range endpoint.
    assert [u for u in dashboard.requests if "/logs?follow=true" in u]
    assert not [u for u in dashboard.requests if "/lines?" in u]
    # One page is one follower: the SSE answer and the StreamLogs call
    # behind it count once together in the gauge.
    streams = control.plane.metrics.registry.get_sample_value("conveyor_log_streams_active")
    assert streams == 1
    await dashboard.screenshot("build-running.png")

    # Scrolling up pauses following; "Follow" resumes it.
    await log.evaluate("e => { e.scrollTop = 0; }")
    await expect(page.locator("#log-follow")).to_be_visible()
    await live_runner.append(assignment, 3, ["after the reader scrolled up"])
    await expect(log.locator("#L205")).to_be_attached()
    assert await log.evaluate("e => e.scrollTop") == 0
    await page.click("#log-follow")
    assert await log.evaluate("e => e.scrollTop + e.clientHeight >= e.scrollHeight - 8")

    # Cancel from the page: the runner is told, and its report flips the page.
    await page.click("#cancel")
    cancel = await live_runner.cancels.get()
    assert cancel.build_id == build.id
    await live_runner.report(assignment, pb.BUILD_STATUS_CANCELED, reason="stopped")
    await expect(page.locator("#summary .badge")).to_have_text("canceled", timeout=8000)
    await expect(page.locator("#summary .reason")).to_contain_text("canceled by acme-token")

    # Retry opens the new build's page, which follows it to its failure.
    await page.click("#retry")
    await expect(page).not_to_have_url(re.compile(f"/builds/{build.id}$"))
    retried = page.url.rsplit("/", 1)[-1]
    assert (await writer_api.get(retried)).retry_of == build.id
    await expect(page.locator("#summary")).to_contain_text("retry")
    again = await live_runner.next_assignment()
    assert again.build_id == retried
    await live_runner.report(again, pb.BUILD_STATUS_RUNNING)
    await live_runner.append(again, 1, ["$ make test", "\x1b[31mFAILED\x1b[0m test_login"])
    await expect(log.locator("#L2")).to_contain_text("FAILED test_login")
    await live_runner.report(
        again,
        pb.BUILD_STATUS_FAILED,
        reason="exit_code=2 in step build",
        steps=[
            step(0, "clone", pb.STEP_STATUS_SUCCEEDED, 0),
            step(1, "build", pb.STEP_STATUS_FAILED, 2),
            step(2, "deploy", pb.STEP_STATUS_SKIPPED),
        ],
    )
    await expect(page.locator("#summary .badge")).to_have_text("failed", timeout=8000)
    await expect(page.locator("#summary .reason")).to_have_text("exit_code=2 in step build")
    await expect(page.locator("#step-1")).to_have_attribute("open", "")
    await expect(page.locator("#step-0")).not_to_have_attribute("open", "")
    await dashboard.screenshot("build-failed.png", full_page=True)
    assert not [e for e in dashboard.console_errors if "Content Security Policy" in e]
