"""Part 9: the dashboard: a large build page, live lines in a browser, many SSE followers.

`conveyor up` (control plane + one runner agent with the local bubblewrap
launcher) runs against its own database; the browser is Debian's
`chromium`, headless, driven by Playwright for Python (as in tests/web/),
signed in through the login form with an API token.

Build page of a large log: a build of `true` runs to its end; then its log
gets 1,000,000 lines through the control plane's storage ingest path
(LogStore.append_packed, 5,000-line batches, as the runner service stores
them). The page is opened several times in fresh tabs; time to first byte
is the browser's Navigation Timing (responseStart), time to last line
visible is the first animation frame, counted from navigation start, at
which the last line's element (`#L<n>`) is laid out and the log box is
scrolled to its end.

Live line → browser: a build prints one line, then ``tick <unix time>``
lines at a steady rate (as in part 3) behind a gate file that is created
once the control plane's `conveyor_log_streams_active` gauge shows both
followers attached: the build page (its EventSource on the API's SSE
follow) and one terminal follower (`StreamLogs(follow=True)` over gRPC
in its own process, bench.follower). In the page, a MutationObserver on the log takes the time
each line's element is added to the DOM, and a requestAnimationFrame
callback the start of the frame that paints it. Latency = that time minus
the time written in the line (one clock: same machine).

200 SSE followers: processes of 100 connections each (bench.sse_follower)
follow a build over `GET /api/v1/builds/{id}/logs?follow=true` with
`Accept: text/event-stream`. An SSE answer begins with its first event,
so the followers attach after the build's first line and the gate opens
once every process says all its responses are open. The control plane's
CPU time (its process, the runner agent excluded) is read over the
printing window, and each follower records every tick line's delivery
latency. For comparison the same build shape is then followed by as many
gRPC `StreamLogs` followers.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, BrowserContext, async_playwright

from bench.client import Api, Forge, Watcher
from bench.context import Context
from bench.figures import Figure, PartResult, at_most, summary
from bench.gitrepo import Repo
from bench.live_tail import _wait_streams
from bench.live_tail import build_command as gated_ticks
from bench.processes import BenchError, ConveyorUp, UsageMeter, poll
from control.storage.db import Database
from control.storage.logs import LogStore

PART = "9 dashboard"
REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("CONVEYOR_BENCH_CHROMIUM", "/usr/bin/chromium"))
# The browser tests' flags (tests/web/conftest.py): no sandbox inside the
# build machine's container, no background traffic that would share the CPU.
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
BATCH = 5_000  # the runner's largest log batch
FOLLOWERS_PER_PROCESS = 100
PAGE_TIMEOUT_MS = 60_000
# Issue 12's goals.
BROWSER_P99_MS = 500.0
TERMINAL_P99_MS = 250.0

# True (as the time since navigation start, ms) once line ``n`` is laid out
# and the log box is scrolled to its end; checked at every animation frame.
LAST_LINE_VISIBLE = """
(n) => {
  const line = document.getElementById(`L${n}`);
  const log = document.getElementById("log");
  if (!line || !log || line.getBoundingClientRect().height === 0) return false;
  if (log.scrollTop + log.clientHeight < log.scrollHeight - 8) return false;
  return performance.now();
}
"""
NAVIGATION = """
() => {
  const n = performance.getEntriesByType("navigation")[0];
  return {ttfb: n.responseStart, response_end: n.responseEnd,
          dom_content_loaded: n.domContentLoadedEventEnd, bytes: n.encodedBodySize};
}
"""
# Records [written, added to the DOM, next animation frame] (unix s) for
# every tick line the page appends to its log.
OBSERVE_TICKS = """
() => {
  window.benchTicks = [];
  const now = () => (performance.timeOrigin + performance.now()) / 1000;
  new MutationObserver((records) => {
    const added = now();
    const written = [];
    for (const record of records) {
      for (const node of record.addedNodes) {
        const text = node.querySelector ? node.querySelector(".lt")?.textContent || "" : "";
        if (text.startsWith("tick ")) written.push(Number(text.split(" ")[1]));
      }
    }
    if (!written.length) return;
    requestAnimationFrame(() => {
      const painted = now();
      for (const w of written) window.benchTicks.push([w, added, painted]);
    });
  }).observe(document.getElementById("log"), { childList: true });
}
"""


def build_command(gate: Path, lines: int, interval: float) -> str:
    """Part 3's gated tick printer, after one line printed at once: an SSE
    answer starts with its first event, so without a line before the gate
    every follower's response headers would go out with the first tick and
    that tick would time the opening of 200 responses, not their delivery."""
    return f"echo waiting for the bench; {gated_ticks(gate, lines, interval)}"


async def run(
    ctx: Context,
    log_lines: int = 1_000_000,
    page_runs: int = 5,
    live_lines: int = 300,
    rate: float = 10.0,
    sse_followers: int = 200,
    sse_seconds: float = 20.0,
) -> PartResult:
    """Raises ``BenchError`` when Chromium is missing, a follower fails or
    misses lines, or a page never shows its last line."""
    if not await asyncio.to_thread(CHROMIUM.exists):
        raise BenchError(f"{CHROMIUM} is missing: scripts/bootstrap installs Debian's chromium")
    work = ctx.part_dir("dashboard")
    database_url = await ctx.postgres.new_database("dashboard")
    repo = Repo(work / "repo")
    figures: list[Figure] = []
    raw: dict[str, Any] = {}
    async with ConveyorUp(work, database_url, profile=ctx.profile("dashboard")) as up:
        await up.start()
        api = Api(up.grpc_address, up.token)
        watcher = await Watcher(database_url).start()
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(
                    executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
                )
                try:
                    context = await _signed_in(browser, up)
                    big, last = await _large_log(up, api, watcher, repo, database_url, log_lines)
                    raw["page"] = await _open_page(context, up, big, last, page_runs)
                    raw["live"] = await _live(up, api, watcher, repo, context, live_lines, rate)
                finally:
                    await browser.close()
            lines = round(sse_seconds * rate)
            raw["sse"] = await _many(
                up, api, watcher, repo, "sse", sse_followers, lines, rate
            )  # fmt: skip
            raw["grpc"] = await _many(
                up, api, watcher, repo, "grpc", sse_followers, lines, rate
            )  # fmt: skip
        finally:
            await watcher.close()
            await api.close()
    figures += _page_figures(raw["page"], log_lines)
    figures += _live_figures(raw["live"])
    figures += _many_figures(raw["sse"], raw["grpc"], sse_followers)
    return PartResult("dashboard", figures, raw)


async def _signed_in(browser: Browser, up: ConveyorUp) -> BrowserContext:
    """A browser context signed in through the login form."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = await context.new_page()
    await page.goto(f"{up.http_url}/login")
    await page.fill("input[name=token]", up.token)
    await page.click("button[type=submit]")
    await page.wait_for_load_state()
    if page.url.rstrip("/").endswith("/login"):
        raise BenchError("signing in to the dashboard failed")
    await page.close()
    return context


async def _large_log(
    up: ConveyorUp, api: Api, watcher: Watcher, repo: Repo, database_url: str, lines: int
) -> tuple[str, int]:
    """A finished build whose log holds ``lines`` more lines; return its id
    and its last line number."""
    project = await api.create_project("big-log", str(repo.path), "true")
    forge = Forge(up.http_url, project)
    try:
        _t0, build_id = await forge.push("main", repo.commit("main", "big log"))
    finally:
        await forge.close()
    await watcher.wait_final([build_id], 120)
    cur = await watcher.db().execute("SELECT last_seq FROM builds WHERE id = %s", (build_id,))
    row = await cur.fetchone()
    seq = int(row[0]) if row else 0
    db = Database(database_url)
    await db.open()
    try:
        store = LogStore(db)
        now_ms = int(time.time() * 1000)
        last_line = 0
        for first in range(1, lines + 1, BATCH):
            seq += 1
            count = min(BATCH, lines + 1 - first)
            packed = "\n".join(
                f"{now_ms}\to\tstep {n}: \x1b[32mok\x1b[0m compiling module_{n % 977}.py"
                for n in range(first, first + count)
            )
            last_line = (await store.append_packed(build_id, seq, packed, count)).last_line
    finally:
        await db.close()
    return build_id, last_line


async def _open_page(
    context: BrowserContext, up: ConveyorUp, build_id: str, last_line: int, runs: int
) -> dict[str, Any]:
    """Open the build page ``runs`` times, each in a fresh tab; ``last_line``
    is the log's last line number (the build's own lines come first)."""
    visible: list[float] = []
    navigations: list[dict[str, float]] = []
    url = f"{up.http_url}/builds/{build_id}"
    for _ in range(runs):
        page = await context.new_page()
        try:
            await page.goto(url, wait_until="commit")
            handle = await page.wait_for_function(
                LAST_LINE_VISIBLE, arg=last_line, polling="raf", timeout=PAGE_TIMEOUT_MS
            )
            visible.append(float(await handle.json_value()))
            navigations.append(await page.evaluate(NAVIGATION))
        finally:
            await page.close()
    return {
        "last_line": last_line,
        "visible_ms": visible,
        "ttfb_ms": [n["ttfb"] for n in navigations],
        "navigations": navigations,
    }


async def _live(
    up: ConveyorUp,
    api: Api,
    watcher: Watcher,
    repo: Repo,
    context: BrowserContext,
    lines: int,
    rate: float,
) -> dict[str, Any]:
    """One build followed by the build page and one gRPC follower."""
    gate = repo.path / ".go-live"
    project = await api.create_project("live", str(repo.path), build_command(gate, lines, 1 / rate))
    forge = Forge(up.http_url, project)
    try:
        _t0, build_id = await forge.push("main", repo.commit("main", "live"))
    finally:
        await forge.close()
    await _wait_printed(watcher, build_id, 120)
    page = await context.new_page()
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.follower", up.grpc_address, up.token, build_id, "1",
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await page.goto(f"{up.http_url}/builds/{build_id}")
        await page.evaluate(OBSERVE_TICKS)
        # Both wait for the first tick: the page has every stored line, the
        # gRPC call has sent them; each counts once in the gauge until then.
        await _wait_streams(up.http_url, 2, 60)
        await asyncio.to_thread(gate.touch)
        await watcher.wait_final([build_id], lines / rate + 120)
        out, _ = await asyncio.wait_for(follower.communicate(), 120)
        # The page appends the last lines before the final event closes the
        # stream; give its last animation frame a moment.
        for _ in range(50):
            ticks: list[list[float]] = await page.evaluate("() => window.benchTicks")
            if len(ticks) >= lines:
                break
            await asyncio.sleep(0.1)
    finally:
        await page.close()
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    data = json.loads(out or b"{}")
    if follower.returncode != 0 or not data:
        raise BenchError(f"the gRPC follower failed: {data.get('errors') if data else out!r}")
    terminal = [latency * 1000 for _written, latency in data["samples"]]
    if len(terminal) != lines or len(ticks) != lines:
        raise BenchError(
            f"of {lines} tick lines the page showed {len(ticks)}, the terminal {len(terminal)}"
        )
    # The same line in both: how much later the page had it than the terminal.
    in_terminal = {written: written + latency for written, latency in data["samples"]}
    lag = [(added - in_terminal[written]) * 1000 for written, added, _ in ticks]
    return {
        "lines": lines,
        "rate": rate,
        "dom": summary([(added - written) * 1000 for written, added, _ in ticks]),
        "painted": summary([(painted - written) * 1000 for written, _, painted in ticks]),
        "terminal": summary(terminal),
        "browser_after_terminal": summary(lag),
    }


async def _many(
    up: ConveyorUp,
    api: Api,
    watcher: Watcher,
    repo: Repo,
    kind: str,
    count: int,
    lines: int,
    rate: float,
) -> dict[str, Any]:
    """``count`` followers of one build over SSE (``kind`` "sse") or gRPC
    ("grpc"); the control plane's CPU over the printing window."""
    gate = repo.path / f".go-{kind}"
    project = await api.create_project(kind, str(repo.path), build_command(gate, lines, 1 / rate))
    forge = Forge(up.http_url, project)
    try:
        _t0, build_id = await forge.push("main", repo.commit("main", kind))
    finally:
        await forge.close()
    sse = kind == "sse"
    module = "bench.sse_follower" if sse else "bench.follower"
    target = up.http_url if sse else up.grpc_address
    await _wait_printed(watcher, build_id, 120)
    procs = []
    for first in range(0, count, FOLLOWERS_PER_PROCESS):
        n = min(FOLLOWERS_PER_PROCESS, count - first)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, target, up.token, build_id, str(n),
            cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if sse else None,
        )  # fmt: skip
        procs.append(proc)
    try:
        if sse:
            # Each SSE follower already had the stored line as its first
            # event; the processes say when all their responses are open.
            for proc in procs:
                assert proc.stderr is not None
                line = await asyncio.wait_for(proc.stderr.readline(), 60)
                if line.strip() != b"attached":
                    raise BenchError(f"an SSE follower process did not attach: {line!r}")
        else:
            await _wait_streams(up.http_url, count, 60)
        meter = UsageMeter([up.pid])
        clients = UsageMeter([p.pid for p in procs])
        meter.start()
        clients.start()
        await asyncio.to_thread(gate.touch)
        await watcher.wait_final([build_id], lines / rate + 120)
        usage, client_usage = meter.stop(), clients.stop()
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 120)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    samples: list[float] = []
    by_second: dict[int, list[float]] = {}
    for proc, (out, _) in zip(procs, outputs, strict=True):
        data = json.loads(out or b"{}")
        if proc.returncode != 0 or not data:
            raise BenchError(f"a {kind} follower failed: {data.get('errors') if data else out!r}")
        for written, latency in data["samples"]:
            samples.append(latency * 1000)
            by_second.setdefault(int(written), []).append(latency * 1000)
    if len(samples) != count * lines:
        raise BenchError(f"{kind} followers got {len(samples)} tick lines, not {count * lines}")
    seconds = sorted(by_second)
    later = [v for second in seconds[1:] for v in by_second[second]]
    return {
        **summary(samples),
        "followers": count,
        "lines": lines,
        "rate": rate,
        "window_s": usage.seconds,
        "cpu_percent": usage.cpu_percent,
        "rss_mb": usage.rss_mb,
        "follower_processes_cpu_percent": client_usage.cpu_percent,
        "first_second": summary(by_second[seconds[0]]),
        "after_first_second": summary(later),
        # Whether latency grew over the window (a backlog) or stayed flat.
        "p50_max_by_second": [
            [round(statistics.median(v)), round(max(v))] for _, v in sorted(by_second.items())
        ],
    }


async def _wait_printed(watcher: Watcher, build_id: str, within: float) -> None:
    """Wait until the build's first line (before its gate) is stored."""

    async def printed() -> bool:
        cur = await watcher.db().execute(
            "SELECT 1 FROM log_chunks WHERE build_id = %s AND data LIKE %s LIMIT 1",
            (build_id, "%waiting for the bench%"),
        )
        return await cur.fetchone() is not None

    if not await poll(printed, within, every=0.1):
        raise BenchError(f"build {build_id} printed nothing within {within:.0f} s")


def _page_figures(r: dict[str, Any], lines: int) -> list[Figure]:
    n = len(r["visible_ms"])
    size = f"{lines:,} lines"
    kb = statistics.median(nav["bytes"] for nav in r["navigations"]) / 1024
    return [
        Figure(PART, f"build page, time to first byte ({size}) p50",
               statistics.median(r["ttfb_ms"]), "ms",
               note=f"n={n} page loads, fresh tab each; page {kb:.0f} KB"),
        Figure(PART, f"build page, time to first byte ({size}) max", max(r["ttfb_ms"]), "ms"),
        Figure(PART, f"build page, time to last line visible ({size}) p50",
               statistics.median(r["visible_ms"]), "ms", at_most(2000),
               note="navigation start → first frame with the last line laid out, log at its end"),
        Figure(PART, f"build page, time to last line visible ({size}) max",
               max(r["visible_ms"]), "ms", at_most(2000)),
        Figure(PART, "build page, DOMContentLoaded p50",
               statistics.median(nav["dom_content_loaded"] for nav in r["navigations"]), "ms",
               note="after the page's module script rendered the 1,000 tail lines"),
    ]  # fmt: skip


def _live_figures(r: dict[str, Any]) -> list[Figure]:
    dom, painted, terminal = r["dom"], r["painted"], r["terminal"]
    lag = r["browser_after_terminal"]
    note = f"n={r['lines']} lines at {r['rate']:g}/s, one build, both followers at once"
    return [
        Figure(PART, "line written → in the browser DOM p50", dom["p50"], "ms", note=note),
        Figure(PART, "line written → in the browser DOM p99", dom["p99"], "ms",
               at_most(BROWSER_P99_MS)),
        Figure(PART, "line written → in the browser DOM max", dom["max"], "ms"),
        Figure(PART, "line written → painted (next frame) p99", painted["p99"], "ms",
               note=f"p50 {painted['p50']:.0f} ms"),
        Figure(PART, "line written → terminal follower (gRPC) p50", terminal["p50"], "ms"),
        Figure(PART, "line written → terminal follower (gRPC) p99", terminal["p99"], "ms",
               at_most(TERMINAL_P99_MS)),
        Figure(PART, "same line: in the browser DOM after the terminal, p99", lag["p99"], "ms",
               at_most(TERMINAL_P99_MS), note=f"p50 {lag['p50']:.1f} ms; lines matched by text"),
    ]  # fmt: skip


def _many_figures(sse: dict[str, Any], grpc: dict[str, Any], count: int) -> list[Figure]:
    def cpu_note(r: dict[str, Any]) -> str:
        return (
            f"{r['cpu_percent'] / 100:.3f} CPU-s per s over {r['window_s']:.0f} s;"
            f" the followers' own processes: {r['follower_processes_cpu_percent']:.0f} %"
        )

    def split_note(r: dict[str, Any]) -> str:
        first, later = r["first_second"], r["after_first_second"]
        return (
            f"first second's lines p50 {first['p50']:.0f} ms, max {first['max']:.0f} ms;"
            f" after it p99 {later['p99']:.0f} ms"
        )

    who = f"{count} SSE followers"
    other = f"{count} gRPC followers"
    note = f"n={sse['n']:.0f} deliveries ({sse['lines']} lines at {sse['rate']:g}/s)"
    return [
        Figure(PART, f"control-plane CPU, {who}", sse["cpu_percent"], "% of a core",
               note=cpu_note(sse)),
        Figure(PART, f"write → SSE follower p50, {who}", sse["p50"], "ms", note=note),
        Figure(PART, f"write → SSE follower p99, {who}", sse["p99"], "ms",
               note=split_note(sse)),
        Figure(PART, f"write → SSE follower max, {who}", sse["max"], "ms"),
        Figure(PART, f"control-plane CPU, {other} (same build shape)", grpc["cpu_percent"],
               "% of a core", note=cpu_note(grpc)),
        Figure(PART, f"write → gRPC follower p50, {other}", grpc["p50"], "ms"),
        Figure(PART, f"write → gRPC follower p99, {other}", grpc["p99"], "ms",
               note=split_note(grpc)),
    ]  # fmt: skip
