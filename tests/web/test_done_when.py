"""Issue 12's "done when", in a real browser: a person runs `conveyor up`
(as `scripts/up` does), opens the URL it prints, signs in with the token it
prints, clicks from the projects page into the demo build and watches its
log grow live."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from playwright.async_api import Browser, expect

from tests.helpers import git, open_up
from tests.web.conftest import SCREENSHOTS

# The demo build of a fresh data directory, made slow enough to be watched:
# `up` keeps a demo repository that already exists, so this script is what
# its demo project builds. It prints a line every 0.2 s until canceled.
SLOW_DEMO = (
    "#!/usr/bin/env bash\n"
    "set -euo pipefail\n"
    'echo "building $CONVEYOR_PROJECT on $CONVEYOR_BRANCH"\n'
    'for i in $(seq 1 300); do echo "demo tick $i"; sleep 0.2; done\n'
)
PRINTED = re.compile(r"dashboard: (http://\S+)/\s+\(sign in with the token (\S+)\)")
DEMO = re.compile(r"demo: project 'demo' created; build ([0-9a-f-]{36}) queued")


class Terminal:
    """`conveyor up` with its stdout on a pseudo-terminal, as in a person's
    shell: only then does it print the admin token itself."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.master = master
        self.text = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the process closed the terminal
                return
            if not chunk:
                return
            self.text += chunk.decode(errors="replace")

    async def wait_for(self, pattern: re.Pattern[str], timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (found := pattern.search(self.text)) is None:
            assert self.proc.poll() is None, f"conveyor up exited:\n{self.text}"
            assert time.monotonic() < deadline, f"no {pattern.pattern!r}:\n{self.text}"
            await asyncio.sleep(0.05)
        return found

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 40)
        except TimeoutError:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = await asyncio.to_thread(self.proc.wait)
        self.reader.join(5)
        with contextlib.suppress(OSError):
            os.close(self.master)
        return code


def slow_demo_repo(path: Path) -> None:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "build.sh").write_text(SLOW_DEMO)
    (path / "build.sh").chmod(0o755)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "demo")
    open_up(path)


async def test_scripts_up_sign_in_click_into_the_demo_build_and_watch_it_live(
    tmp_path: Path, database_url: str, browser: Browser
) -> None:
    data_dir = tmp_path / "data"
    await asyncio.to_thread(slow_demo_repo, data_dir / "demo-repo")
    up = Terminal(
        [sys.executable, "-m", "conveyor_cli.main", "up", "--data-dir", str(data_dir),
         "--grpc-port", "0", "--http-port", "0"],
        # The session's PostgreSQL instead of a second embedded one, as in
        # tests/observability/test_conveyor_up.py.
        {**os.environ, "CONVEYOR_DATABASE_URL": database_url},
    )  # fmt: skip
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    try:
        url, token = (await up.wait_for(PRINTED)).groups()
        build_id = (await up.wait_for(DEMO)).group(1)
        page = await context.new_page()
        follows: list[str] = []
        page.on("request", lambda r: follows.append(r.url) if "follow=true" in r.url else None)

        # The printed URL asks for the token, then shows the projects.
        await page.goto(url + "/")
        await page.fill("input[name=token]", token)
        await page.click("button[type=submit]")
        await page.click("#projects >> text=demo")
        await page.click(f'a[href="/builds/{build_id}"]')
        assert page.url == f"{url}/builds/{build_id}"

        # Lines arrive while the reader watches, over the event stream.
        log = page.locator("#log")
        await expect(log).to_contain_text("demo tick", timeout=30_000)
        await expect(page.locator("#summary .badge")).to_have_text("running")
        seen = await log.locator(".line").count()
        await expect(log.locator(f"#L{seen + 5}")).to_contain_text("demo tick")
        assert follows, "the page did not follow the log over SSE"
        if os.environ.get("CONVEYOR_SCREENSHOTS"):  # the README's "demo build" picture
            await page.screenshot(path=str(SCREENSHOTS / "build.png"))

        # The admin session may cancel; the page shows the end without a reload.
        await page.click("#cancel")
        await expect(page.locator("#summary .badge")).to_have_text("canceled", timeout=20_000)
    finally:
        await context.close()
        code = await up.stop()
    assert code == 0, up.text
