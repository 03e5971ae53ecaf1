"""`conveyor runners list` and `builds show` tell each runner's sandbox
mode, as real runner agents report it in their hello."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import Api, ControlHandle, RunnerProcess, cli, git


async def test_runners_list_and_builds_show_tell_the_sandbox_mode(
    api: Api, control: ControlHandle, runner: RunnerProcess, repo: Path, tmp_path: Path
) -> None:
    bare = RunnerProcess(control.plane.grpc_address, control.runner_token, tmp_path / "bare", 2)
    await bare.start("--sandbox", "none", "--label", "gpu")
    try:
        await control.wait_runners(2)
        code, out, err = await cli(control, "runners", "list", "--json")
        assert (code, err) == (0, "")
        listed = json.loads(out)
        by_sandbox = {r["sandbox"]: r for r in listed["runners"]}
        assert set(by_sandbox) == {"bubblewrap", "none"}
        assert by_sandbox["none"]["labels"] == ["gpu"]
        assert by_sandbox["none"]["capacity"] == 2
        assert by_sandbox["none"]["connected"] is True
        assert by_sandbox["none"]["draining"] is False
        assert by_sandbox["none"]["last_seen_at"]
        assert listed["queue"] == {"queued": 0, "active": 0, "limit": 6}

        code, text, _ = await cli(control, "runners", "list")
        assert code == 0
        assert "SANDBOX" in text.splitlines()[0]
        row = next(x for x in text.splitlines() if x.startswith(by_sandbox["none"]["id"][:8]))
        assert "none" in row.split()
        assert "gpu" in row.split()
        assert "WARNING runner" in text
        assert "queue: 0 queued" in text

        # A build records the sandbox of the runner that took it.
        await api.create_project("web", repo)
        build = await api.trigger("web", commit_sha=git(repo, "rev-parse", "HEAD"))
        done = await api.wait_status(build.id)
        mode = next(r["sandbox"] for r in listed["runners"] if r["id"] == done.runner_id)
        assert done.runner_sandbox == mode
        code, shown, _ = await cli(control, "builds", "show", build.id[:8])
        assert code == 0
        assert f"runner     {done.runner_id} (sandbox {mode})" in shown
        # ... and keeps it when the runner later says something else.
        async with control.plane.db.connection() as conn:
            await conn.execute("UPDATE runners SET sandbox = 'changed'")
        assert (await api.get(build.id)).runner_sandbox == mode
    finally:
        await bare.stop()
