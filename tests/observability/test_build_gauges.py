"""The installation-wide build gauges come from PostgreSQL at scrape time,
so every replica reports the truth, including one that handled none of the
transitions (or was restarted since)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor.v1 import types_pb2 as pb
from tests.helpers import Api, ControlHandle, ProtocolRunner, git
from tests.observability.scrape import scrape, scrape_until


async def test_every_replica_reports_the_queue_and_active_builds_from_the_database(
    control: ControlHandle, database_url: str, api: Api, repo: Path
) -> None:
    replica = ControlHandle(database_url)
    await replica.start()
    runner: ProtocolRunner | None = None
    try:
        account = control.plane.admin_account_id

        def waiting(n: int) -> dict[tuple[tuple[str, str], ...], float]:
            """The queue-depth series when ``n`` builds of the account wait."""
            return {(("account_id", account),): n} if n else {}

        sha = await asyncio.to_thread(git, repo, "rev-parse", "HEAD")
        await api.create_project("gauged", repo)
        # Three branches, so none supersedes another; no runner yet.
        for branch in ("main", "one", "two"):
            await api.trigger("gauged", branch=branch, commit_sha=sha)

        for url in (control.http_url, replica.http_url):
            metrics = await scrape(url + "/metrics")
            assert metrics.series("conveyor_queue_depth") == waiting(3)
            assert metrics.value("conveyor_oldest_queued_build_age_seconds") > 0
            assert metrics.value("conveyor_active_builds") == 0
            assert metrics.has("conveyor_active_builds")

        # One slot, on the first replica: one build starts there.
        runner = ProtocolRunner(control.plane.grpc_address, control.runner_token, capacity=1)
        await runner.start()
        a = await runner.next_assignment()
        await runner.report(a, pb.BUILD_STATUS_INITIALIZING)
        await runner.report(a, pb.BUILD_STATUS_RUNNING)

        # The replica's lifecycle saw none of it, and its scrape shows it.
        metrics = await scrape_until(
            replica.http_url + "/metrics", lambda m: m.value("conveyor_active_builds") == 1
        )
        assert metrics.series("conveyor_queue_depth") == waiting(2)
        assert metrics.value("conveyor_build_queue_seconds_count") == 0

        await runner.report(a, pb.BUILD_STATUS_SUCCEEDED)
        # A restarted process starts with fresh counters but the same gauges;
        # the freed slot takes the next build (handed out, not started yet).
        await replica.stop()
        replica = ControlHandle(database_url)
        await replica.start()
        metrics = await scrape_until(
            replica.http_url + "/metrics",
            lambda m: (
                m.value("conveyor_active_builds") == 0
                and m.series("conveyor_queue_depth") == waiting(1)
            ),
        )
        assert metrics.value("conveyor_builds_finished_total", status="succeeded") == 0
    finally:
        if runner is not None:
            await runner.close()
        await replica.stop()
