"""The list pages in a real browser: projects with their last build, a
project's builds filtered and paged by the server, its skipped pushes,
settings and variables (secret values never shown), Trigger build, the
runners page, and rows that update without a reload."""

from __future__ import annotations

import json
from pathlib import Path

from playwright.async_api import expect

from conveyor.v1 import config_service_pb2 as cs
from tests.helpers import (
    Api,
    ControlHandle,
    ProtocolRunner,
    git,
    github_headers,
    github_push,
    post_webhook,
)
from tests.web.conftest import Dashboard, Tenant

HOSTILE = '<script>alert("x")</script>'
SECRET_VALUE = "s3cr3t-value-never-shown"


async def test_project_pages_and_runners(
    control: ControlHandle,
    dashboard: Dashboard,
    writer: Tenant,
    writer_api: Api,
    live_runner: ProtocolRunner,
    repo: Path,
) -> None:
    git(repo, "branch", "feature/login")
    project = await writer_api.create_project(
        "web", repo, build_command=f"echo '{HOSTILE}'", preview_command="echo preview"
    )
    await writer_api.create_project("docs", repo)
    for name, value, secret in (("API_KEY", SECRET_VALUE, True), ("MODE", "fast", False)):
        await writer_api.config.SetEnvVar(
            cs.SetEnvVarRequest(project="web", name=name, value=value, secret=secret),
            metadata=writer_api.metadata,
        )
    body = github_push("main", "a" * 40, message="docs only [skip ci]")
    status, _ = await post_webhook(
        f"{control.http_url}/webhooks/github/{project.id}",
        body,
        github_headers(project.webhook_secret, body),
    )
    assert status == 200
    # A tag push with no tag rule is skipped too, and the page names it as
    # a tag, not as a branch called "refs/tags/...".
    tag_push = json.loads(github_push("main", "b" * 40))
    tag_push["ref"] = "refs/tags/v1.2.0"
    body = json.dumps(tag_push).encode()
    status, _ = await post_webhook(
        f"{control.http_url}/webhooks/github/{project.id}",
        body,
        github_headers(project.webhook_secret, body),
    )
    assert status == 200
    # 26 builds of main (one more than a page) and one of a feature branch;
    # the runner takes the first few, the rest wait in the queue.
    main_builds = [(await writer_api.trigger("web")).id for _ in range(26)]
    feature = await writer_api.trigger("web", branch="feature/login")

    page = dashboard.page
    await dashboard.sign_in(writer.token)
    rows = page.locator("#projects tbody tr")
    await expect(rows).to_have_count(2)
    await expect(rows.nth(1)).to_contain_text("web")
    await expect(rows.nth(1)).to_contain_text("feature/login")
    await expect(rows.nth(0)).to_contain_text("no build yet")
    await dashboard.screenshot("projects.png")

    # Rows follow the builds without a reload.
    await writer_api.cancel(feature.id)
    await expect(rows.nth(1).locator(".badge")).to_have_text("canceled", timeout=8000)

    await page.click("text=web")
    await expect(page.locator("h1")).to_have_text("web")
    builds = page.locator("#builds tbody tr")
    await expect(builds).to_have_count(25)
    await expect(builds.first).to_contain_text("feature/login")
    # Untrusted project fields are text, never markup.
    await expect(page.locator("dd code", has_text=HOSTILE)).to_have_count(1)
    assert await page.locator("main script").count() == 0
    # Variables: the secret's name, never its value.
    await expect(page.locator("text=API_KEY")).to_have_count(1)
    await expect(page.locator("text=fast")).to_have_count(1)
    assert SECRET_VALUE not in await page.content()
    await expect(page.locator("text=skipped: [skip ci] in the commit message")).to_have_count(1)
    tag_row = page.locator("tr", has=page.locator("code", has_text="bbbbbbb"))
    await expect(tag_row.locator("td").nth(2)).to_have_text("tag v1.2.0")
    await expect(tag_row.locator(".branch")).to_have_count(0)
    await dashboard.screenshot("project.png", full_page=True)

    # The next page holds the oldest build; filters are applied by the server.
    await page.click("text=Older builds")
    await expect(builds).to_have_count(2)
    await expect(page.locator(f'a[href="/builds/{main_builds[0]}"]')).to_have_count(1)
    await page.goto(f"{dashboard.url}/projects/web?branch=feature%2Flogin")
    await expect(builds).to_have_count(1)
    await page.select_option("select[name=status]", "queued")
    await page.click("text=Filter")
    await expect(page.locator("#builds")).to_contain_text("No builds match these filters")

    # Trigger a build of a branch from the page.
    await page.goto(f"{dashboard.url}/projects/web")
    await page.fill("#trigger-branch", "feature/login")
    await page.click("text=Trigger build")
    await expect(page.locator("#summary")).to_contain_text("feature/login")
    await expect(page.locator("#summary .badge")).to_have_text("queued")

    await page.click("text=Runners")
    runner_rows = page.locator("#runners tbody tr")
    await expect(runner_rows).to_have_count(1)
    await expect(runner_rows.first).to_contain_text("proto")
    await expect(runner_rows.first).to_contain_text("/ 4")
    await expect(runner_rows.first.locator(".badge")).to_have_text("connected")
    await expect(page.locator(".queue")).to_contain_text("Waiting")
    await dashboard.screenshot("runners.png")
    assert not [e for e in dashboard.console_errors if "Content Security Policy" in e]
