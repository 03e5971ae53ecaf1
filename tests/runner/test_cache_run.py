"""The build cache around real sandboxed jobs: the build script and the
runner's ``CacheRun`` over the two pipes, with the local launcher and both
stores (a directory, and S3 through boto3 against moto's server over HTTP).

Each test runs builds the way ``BuildRun`` does (script markers fed to
``CacheRun``, ``finish`` after the job) and looks at what they printed,
what they found in their workspace, and what the store holds.
"""

from __future__ import annotations

import io
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from runner.cache import BuildCache, CachePolicy, LocalDirCache, S3Cache, scope_for
from runner.cache_run import CacheRun, CacheTarget
from runner.launchers.base import JobSpec
from runner.launchers.local import LocalLauncher
from runner.metrics import RunnerMetrics
from runner.script import BuildScript, CachePlan
from tests.helpers import commit, git, make_repo

pytestmark = pytest.mark.timeout(90)

LOCKS = ("requirements*.txt", "package-lock.json")
# The "dependency install": slow only when deps/ is not there yet.
INSTALL = (
    'if [ -f deps/installed ]; then echo "deps from $(cat deps/installed)";'
    ' else mkdir -p deps && echo "$CONVEYOR_BUILD_ID" > deps/installed && echo installed; fi'
)


@dataclass
class Outcome:
    build_id: str
    exit_code: int | None
    stdout: list[str]
    system: list[str]

    def said(self, text: str) -> bool:
        return any(text in line for line in self.system)


@pytest.fixture
def cache(build_dir: Path) -> BuildCache:
    return BuildCache(LocalDirCache(build_dir / "cache"))


@pytest.fixture
def repo(build_dir: Path) -> Path:
    path = make_repo(build_dir / "repo")
    commit(path, "requirements.txt", "requests==2.32.3\n")
    return path


async def build(
    launcher: LocalLauncher,
    cache: BuildCache,
    repo: Path,
    command: str = INSTALL,
    *,
    paths: tuple[str, ...] = ("deps",),
    locks: tuple[str, ...] = LOCKS,
    production: bool = True,
    branch: str = "main",
    generation: int = 1,
    metrics: RunnerMetrics | None = None,
) -> Outcome:
    """One build of ``repo``'s HEAD with the cache, as ``BuildRun`` runs it."""
    build_id = uuid.uuid4().hex
    system: list[str] = []

    async def say(text: str) -> None:
        system.append(text)

    plan = CachePlan(locks, paths)
    run = CacheRun(
        cache,
        plan,
        CacheTarget("p1", generation, scope_for(production, branch)),
        staging_dir=launcher.work_root.parent / "staging",
        build_id=build_id,
        say=say,
        metrics=metrics or RunnerMetrics(CollectorRegistry()),
    )
    sha = git(repo, "rev-parse", "HEAD")
    script = BuildScript(
        repo_url=str(repo),
        commit_sha=sha,
        branch=branch,
        steps=(("build", command),),
        nonce=BuildScript.new_nonce(),
        cache=plan,
        channel=launcher.control_channel,
    )
    spec = JobSpec(
        build_id=build_id,
        script=script.render(),
        env={"CONVEYOR_BUILD_ID": build_id},
        local_paths=(str(repo),),
        cache_fds=run.pipes.job_fds,
    )
    try:
        job = await launcher.launch(spec)
        run.pipes.close_job_ends()
        stdout: list[str] = []
        async for line in job.output():
            marker = script.marker_of(line)
            if marker is not None and marker.kind.startswith("cache-"):
                await run.on_marker(marker)
            elif marker is None and line.stream == "stdout":
                stdout.append(line.data.decode(errors="replace"))
        result = await job.wait()
        await run.finish(result.exit_code == 0)
    finally:
        run.close()
    return Outcome(build_id, result.exit_code, stdout, system)


def archives(cache: BuildCache) -> list[str]:
    return sorted(o.name for o in cache.store.listing("p1/") if o.name.endswith(".tar.gz"))


async def test_the_second_build_with_the_same_lock_file_restores_the_cache(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    first = await build(launcher, cache, repo)
    assert first.exit_code == 0, first
    assert "installed" in first.stdout
    assert first.said("cache: nothing saved yet for key")
    assert first.said("cache saved: key")
    assert len(archives(cache)) == 1

    second = await build(launcher, cache, repo)
    assert second.exit_code == 0, second
    assert f"deps from {first.build_id}" in second.stdout
    assert second.said("cache restored: key")
    # Same key, same content: an exact hit is not saved again.
    assert not second.said("cache saved")
    assert len(archives(cache)) == 1


async def test_the_s3_store_carries_the_cache_between_builds(
    launcher: LocalLauncher, repo: Path, s3_store: S3Cache
) -> None:
    cache = BuildCache(s3_store)
    first = await build(launcher, cache, repo)
    second = await build(launcher, cache, repo)
    assert second.exit_code == 0, second
    assert f"deps from {first.build_id}" in second.stdout
    listed = s3_store.client.list_objects_v2(Bucket=s3_store.bucket)["Contents"]
    keys = [o["Key"] for o in listed]
    assert any(k.startswith("conveyor-cache/p1/1/production/") for k in keys)


async def test_a_changed_lock_file_falls_back_to_the_newest_production_cache(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    first = await build(launcher, cache, repo)
    commit(repo, "requirements.txt", "requests==2.32.4\n")
    second = await build(launcher, cache, repo)
    assert f"deps from {first.build_id}" in second.stdout
    assert second.said("cache restored: the newest of production")
    assert second.said("cache saved: key")
    assert len(archives(cache)) == 2
    third = await build(launcher, cache, repo)
    assert third.said("cache restored: key")
    assert not third.said("cache saved")


async def test_a_branch_never_writes_where_production_restores(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    # A pull request chooses its branch name; its builds are not production.
    branch = await build(
        launcher, cache, repo, "mkdir -p deps && echo poisoned > deps/installed",
        production=False, branch="main",
    )  # fmt: skip
    assert branch.said("cache saved")
    production = await build(launcher, cache, repo)
    assert "installed" in production.stdout
    assert production.said("cache: nothing saved yet")
    # The branch, in turn, restores production's archive of the same key.
    again = await build(launcher, cache, repo, production=False, branch="feature")
    assert f"deps from {production.build_id}" in again.stdout


async def test_a_purge_generation_starts_empty(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    await build(launcher, cache, repo, generation=1)
    after = await build(launcher, cache, repo, generation=2)
    assert "installed" in after.stdout
    assert after.said("cache saved")
    assert all(name.startswith("p1/2/") for name in archives(cache))


async def test_an_archive_over_the_limit_is_not_saved_and_the_build_succeeds(
    launcher: LocalLauncher, build_dir: Path, repo: Path
) -> None:
    cache = BuildCache(LocalDirCache(build_dir / "cache"), CachePolicy(max_entry_bytes=64 * 1024))
    big = await build(
        launcher, cache, repo, "mkdir -p deps && head -c 2000000 /dev/urandom > deps/blob"
    )
    assert big.exit_code == 0, big
    assert big.said("cache not saved: the archive is over the 64.0 KiB limit")
    assert archives(cache) == []


async def test_a_failed_build_saves_nothing(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    failed = await build(launcher, cache, repo, "mkdir -p deps && touch deps/x && exit 3")
    assert failed.exit_code == 3
    assert archives(cache) == []


async def test_a_corrupt_archive_costs_the_cache_not_the_build(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    # Bigger than a pipe's buffer: tar stops reading mid-stream.
    blob = "mkdir -p deps && head -c 3000000 /dev/urandom > deps/blob"
    big = INSTALL.replace("mkdir -p deps", blob)
    await build(launcher, cache, repo, big)
    [name] = archives(cache)
    path = Path(cache.store.root) / name  # type: ignore[attr-defined]
    data = path.read_bytes()
    assert len(data) > 1_000_000
    path.write_bytes(data[:100] + b"garbage" * 1000 + data[7100:])
    after = await build(launcher, cache, repo, big)
    assert after.exit_code == 0, after
    assert after.said("cache: could not restore (unpacking it failed")
    # Nothing of the broken archive was left: the install ran afresh, and
    # the entry that does not unpack is replaced.
    assert "installed" in after.stdout
    assert after.said("cache saved")
    third = await build(launcher, cache, repo, big)
    assert f"deps from {after.build_id}" in third.stdout


async def test_paths_the_repository_tracks_are_not_the_caches(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    (repo / "vendor").mkdir()
    commit(repo, "vendor/modules.txt", "from the repository\n")
    command = f"cat vendor/modules.txt; echo changed > vendor/modules.txt; {INSTALL}"
    first = await build(launcher, cache, repo, command, paths=("deps", "vendor"))
    assert "cache: vendor is in the repository; it is not cached" in first.stdout
    second = await build(launcher, cache, repo, command, paths=("deps", "vendor"))
    assert f"deps from {first.build_id}" in second.stdout
    # The checkout's vendor/, not the one the first build changed.
    assert second.stdout.count("from the repository") == 1
    opened = cache.store.open_read(archives(cache)[0])
    assert opened is not None
    with opened[0], tarfile.open(fileobj=io.BytesIO(opened[0].read()), mode="r:gz") as tar:
        assert not [m.name for m in tar.getmembers() if m.name.startswith("src/vendor")]


async def test_cache_paths_that_are_symlinks_never_carry_host_files(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    await build(launcher, cache, repo, "ln -s /etc deps && ln -s /etc/hostname ~/host")
    [name] = archives(cache)
    opened = cache.store.open_read(name)
    assert opened is not None
    data = opened[0].read()
    opened[0].close()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"src/deps"}
    assert members["src/deps"].issym()
    assert b"root:" not in data


async def test_home_paths_and_the_absence_of_a_lock_file(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    home = "if [ -f ~/.npm/seen ]; then cat ~/.npm/seen; else mkdir -p ~/.npm; echo fresh | tee ~/.npm/seen; fi"  # noqa: E501
    await build(launcher, cache, repo, home, paths=("~/.npm",))
    again = await build(launcher, cache, repo, home, paths=("~/.npm",))
    assert again.stdout[-1] == "fresh"
    assert again.said("cache restored")
    none = await build(launcher, cache, repo, locks=("Cargo.lock",))
    assert none.said("cache: no lock file (Cargo.lock) in the root directory")
    assert not none.said("cache saved")


async def test_steps_never_hold_the_cache_pipes(
    launcher: LocalLauncher, cache: BuildCache, repo: Path
) -> None:
    # A process a step leaves behind would otherwise keep the archive's
    # pipe open, or write into it.
    probe = f"{INSTALL}; for fd in 7 8; do [ ! -e /proc/$$/fd/$fd ] || echo fd $fd open; done"
    done = await build(launcher, cache, repo, probe)
    assert done.exit_code == 0, done
    assert not [line for line in done.stdout if line.startswith("fd ")]
    assert done.said("cache saved")
