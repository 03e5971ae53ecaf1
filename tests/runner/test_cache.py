"""The build cache stores (local directory and S3 through boto3 against
moto's standalone server over HTTP), restore fallback, expiry and limits."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from runner.cache import (
    BuildCache,
    CachePolicy,
    CacheStore,
    LocalDirCache,
    S3Cache,
    lockfile_key,
    object_name,
)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CacheStore:
    if request.param == "local":
        return LocalDirCache(tmp_path / "cache")
    endpoint = request.getfixturevalue("moto_endpoint")
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    bucket = f"b{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    return S3Cache(client, bucket)


def archive(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


async def test_save_then_restore_the_same_key(store: CacheStore, tmp_path: Path) -> None:
    cache = BuildCache(store)
    src = archive(tmp_path, "a.tar.gz", 2048)
    note = await cache.save("p1", 0, "k1", "main", src)
    assert note.startswith("cache saved: key k1")
    got = await cache.restore("p1", 0, "k1", "main", tmp_path / "out.tar.gz")
    assert (got.key, got.fallback, got.bytes) == ("k1", False, 2048)
    assert (tmp_path / "out.tar.gz").read_bytes() == src.read_bytes()


async def test_a_new_key_falls_back_to_the_production_branch(
    store: CacheStore, tmp_path: Path
) -> None:
    cache = BuildCache(store)
    await cache.save("p1", 0, "old-lock", "main", archive(tmp_path, "m.tgz", 100))
    await cache.save("p1", 0, "feature-lock", "feature", archive(tmp_path, "f.tgz", 200))
    got = await cache.restore("p1", 0, "new-lock", "main", tmp_path / "out")
    assert (got.key, got.fallback) == ("old-lock", True)
    nothing = await cache.restore("p2", 0, "new-lock", "main", tmp_path / "none")
    assert nothing.key is None


async def test_a_purge_generation_hides_older_entries(store: CacheStore, tmp_path: Path) -> None:
    cache = BuildCache(store)
    await cache.save("p1", 0, "k", "main", archive(tmp_path, "a", 10))
    assert (await cache.restore("p1", 1, "k", "main", tmp_path / "o")).key is None
    await cache.save("p1", 1, "k2", "main", archive(tmp_path, "b", 10))
    assert not [o for o in store.listing("p1/") if o.name.startswith("p1/0/")]


async def test_oversized_entries_are_not_saved(store: CacheStore, tmp_path: Path) -> None:
    cache = BuildCache(store, CachePolicy(max_entry_bytes=1000))
    note = await cache.save("p1", 0, "k", "main", archive(tmp_path, "big", 5000))
    assert "over the 1000-byte limit" in note
    assert store.listing("p1/") == []


def test_expired_and_excess_entries_are_collected(tmp_path: Path) -> None:
    store = LocalDirCache(tmp_path / "cache")
    cache = BuildCache(store, CachePolicy(max_project_bytes=2500, max_age_days=7))
    for i in range(4):
        store.upload(archive(tmp_path, f"a{i}", 1000), object_name("p", 0, f"k{i}"))
        os.utime(tmp_path / "cache" / object_name("p", 0, f"k{i}"), (0, time.time() - i * 60))
    old = tmp_path / "cache" / object_name("p", 0, "k3")
    os.utime(old, (0, time.time() - 8 * 86400))
    removed = cache.collect("p", 0)
    names = sorted(o.name for o in store.listing("p/"))
    assert names == [object_name("p", 0, "k0"), object_name("p", 0, "k1")]
    assert removed == 2


def test_lockfile_key_follows_contents_and_ignores_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    assert lockfile_key(root, ("package-lock.json",)) is None
    (root / "package-lock.json").write_text('{"a": 1}')
    first = lockfile_key(root, ("package-lock.json", "requirements*.txt"))
    (root / "requirements-dev.txt").write_text("pytest\n")
    second = lockfile_key(root, ("package-lock.json", "requirements*.txt"))
    assert first
    assert second
    assert first != second
    secret = tmp_path / "host-secret"
    secret.write_text("do not read")
    (root / "yarn.lock").symlink_to(secret)
    assert lockfile_key(root, ("package-lock.json", "requirements*.txt", "yarn.lock")) == second
    with pytest.raises(ValueError, match="escapes"):
        LocalDirCache(tmp_path / "cache").upload(secret, "../../escape")
