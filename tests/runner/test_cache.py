"""The build cache stores (local directory and S3 through boto3 against
moto's standalone server over HTTP), restore fallback, expiry and limits."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runner.cache import (
    BuildCache,
    CachePolicy,
    CacheStore,
    Found,
    LocalDirCache,
    S3Cache,
    object_name,
    scope_for,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CacheStore:
    if request.param == "local":
        return LocalDirCache(tmp_path / "cache")
    store: S3Cache = request.getfixturevalue("s3_store")
    return store


def archive(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def read(cache: BuildCache, name: str) -> bytes:
    opened = cache.store.open_read(name)
    assert opened is not None
    handle, size = opened
    try:
        data = handle.read()
    finally:
        handle.close()
    assert len(data) == size
    return data


PROD = scope_for(True, "main")
FEATURE = scope_for(False, "feature")


def test_save_then_find_the_same_key(store: CacheStore, tmp_path: Path) -> None:
    cache = BuildCache(store)
    src = archive(tmp_path, "a.tar.gz", 2048)
    note = cache.save("p1", 0, "k1", PROD, src)
    assert note.startswith("cache saved: key k1, 2.0 KiB")
    found = cache.find("p1", 0, "k1", PROD)
    assert found == Found(object_name("p1", 0, PROD, "k1"), "k1", True, PROD)
    assert read(cache, found.name) == src.read_bytes()
    assert store.open_read(object_name("p1", 0, PROD, "nope")) is None


def test_the_search_order_of_a_branch_build(store: CacheStore, tmp_path: Path) -> None:
    cache = BuildCache(store)
    cache.save("p1", 0, "prod-old", PROD, archive(tmp_path, "a", 10))
    cache.save("p1", 0, "shared", PROD, archive(tmp_path, "b", 10))
    cache.save("p1", 0, "mine", FEATURE, archive(tmp_path, "c", 10))
    # Its key in its own scope, then in production...
    assert cache.find("p1", 0, "mine", FEATURE) == Found(
        object_name("p1", 0, FEATURE, "mine"), "mine", True, FEATURE
    )
    assert cache.find("p1", 0, "prod-old", FEATURE) == Found(
        object_name("p1", 0, PROD, "prod-old"), "prod-old", True, PROD
    )
    # ...then its own newest, then production's newest.
    assert cache.find("p1", 0, "new", FEATURE) == Found(
        object_name("p1", 0, FEATURE, "mine"), "mine", False, FEATURE
    )
    other = scope_for(False, "other")
    assert cache.find("p1", 0, "new", other) == Found(
        object_name("p1", 0, PROD, "shared"), "shared", False, PROD
    )


def test_production_never_restores_a_branch_archive(store: CacheStore, tmp_path: Path) -> None:
    cache = BuildCache(store)
    cache.save("p1", 0, "k", scope_for(False, "main"), archive(tmp_path, "a", 10))
    assert cache.find("p1", 0, "k", PROD) is None
    assert cache.find("p2", 0, "k", PROD) is None


def test_a_purge_generation_hides_older_entries(store: CacheStore, tmp_path: Path) -> None:
    cache = BuildCache(store)
    cache.save("p1", 0, "k", PROD, archive(tmp_path, "a", 10))
    assert cache.find("p1", 1, "k", PROD) is None
    cache.save("p1", 1, "k2", PROD, archive(tmp_path, "b", 10))
    assert not [o for o in store.listing("p1/") if o.name.startswith("p1/0/")]


def test_oversized_entries_are_not_saved(store: CacheStore, tmp_path: Path) -> None:
    cache = BuildCache(store, CachePolicy(max_entry_bytes=1000))
    note = cache.save("p1", 0, "k", PROD, archive(tmp_path, "big", 5000))
    assert "over the 1000-byte limit" in note
    assert store.listing("p1/") == []


def test_expired_and_excess_entries_are_collected(tmp_path: Path) -> None:
    store = LocalDirCache(tmp_path / "cache")
    cache = BuildCache(store, CachePolicy(max_project_bytes=2500, max_age_days=7))
    names = [object_name("p", 0, PROD, f"k{i}") for i in range(4)]
    for i, name in enumerate(names):
        store.upload(archive(tmp_path, f"a{i}", 1000), name)
        os.utime(tmp_path / "cache" / name, (0, time.time() - i * 60))
    os.utime(tmp_path / "cache" / names[3], (0, time.time() - 8 * 86400))
    removed = cache.collect("p", 0)
    assert sorted(o.name for o in store.listing("p/")) == names[:2]
    assert removed == 2


def test_a_restore_counts_as_use(tmp_path: Path) -> None:
    store = LocalDirCache(tmp_path / "cache")
    cache = BuildCache(store, CachePolicy(max_project_bytes=2500))
    names = [object_name("p", 0, PROD, f"k{i}") for i in range(2)]
    for i, name in enumerate(names):
        store.upload(archive(tmp_path, f"a{i}", 1000), name)
        os.utime(tmp_path / "cache" / name, (0, time.time() - 3600 * (i + 1)))
    read(cache, names[1])  # the older one, used just now
    store.upload(archive(tmp_path, "a2", 1000), object_name("p", 0, PROD, "k2"))
    cache.collect("p", 0)
    kept = sorted(o.name for o in store.listing("p/"))
    assert kept == sorted([names[1], object_name("p", 0, PROD, "k2")])


def test_object_names_cannot_escape_the_directory(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("do not read")
    with pytest.raises(ValueError, match="escapes"):
        LocalDirCache(tmp_path / "cache").upload(secret, "../../escape")


def test_concurrent_saves_of_one_key_leave_one_whole_archive(tmp_path: Path) -> None:
    # Two builds (or two runners sharing the directory) saving the same key.
    store = LocalDirCache(tmp_path / "cache")
    sources = [archive(tmp_path, f"src{i}", 4 * 1024 * 1024) for i in range(4)]
    name = object_name("p", 0, PROD, "k")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda src: store.upload(src, name), sources * 3))
    stored = (tmp_path / "cache" / name).read_bytes()
    assert stored in [src.read_bytes() for src in sources]
    assert [o.name for o in store.listing("p/")] == [name]
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_a_save_of_an_older_generation_keeps_the_newer_one(
    store: CacheStore, tmp_path: Path
) -> None:
    # A build dispatched before a purge saves after it.
    cache = BuildCache(store)
    cache.save("p1", 4, "new", PROD, archive(tmp_path, "a", 10))
    cache.save("p1", 3, "old", PROD, archive(tmp_path, "b", 10))
    assert cache.find("p1", 4, "new", PROD) is not None
    cache.save("p1", 5, "newer", PROD, archive(tmp_path, "c", 10))
    assert {o.name.split("/")[1] for o in store.listing("p1/")} == {"5"}


def test_a_pull_request_has_a_scope_of_its_own(store: CacheStore, tmp_path: Path) -> None:
    # Its branch is whatever the fork named it: "main", or a team branch.
    pull = scope_for(False, "develop", 12)
    assert pull not in (PROD, scope_for(False, "develop"), scope_for(False, "develop", 13))
    cache = BuildCache(store)
    cache.save("p1", 0, "k", pull, archive(tmp_path, "a", 10))
    assert cache.find("p1", 0, "k", scope_for(False, "develop")) is None
    assert cache.find("p1", 0, "k", PROD) is None
    cache.save("p1", 0, "k2", PROD, archive(tmp_path, "b", 10))
    assert cache.find("p1", 0, "k2", pull) == Found(
        object_name("p1", 0, PROD, "k2"), "k2", True, PROD
    )


def test_temporary_files_of_unfinished_saves_are_swept(tmp_path: Path) -> None:
    store = LocalDirCache(tmp_path / "cache")
    store.upload(archive(tmp_path, "a", 10), object_name("p", 0, PROD, "k"))
    stale = tmp_path / "cache" / "p" / "0" / PROD / ".k.tar.gz.123.abc.partial"
    fresh = stale.with_name(".k.tar.gz.456.def.partial")
    for path in (stale, fresh):
        path.write_bytes(b"half")
    os.utime(stale, (0, time.time() - 2 * 86400))
    assert store.sweep_partials() == 1
    assert not stale.exists()
    assert fresh.exists()
    assert [o.name for o in store.listing("p/")] == [object_name("p", 0, PROD, "k")]


def test_all_projects_together_stay_under_the_total_limit(tmp_path: Path) -> None:
    # Many small projects, each within its own limit, must not fill the host.
    store = LocalDirCache(tmp_path / "cache")
    cache = BuildCache(store, CachePolicy(max_project_bytes=10_000, max_total_bytes=2500))
    for i in range(4):
        name = object_name(f"p{i}", 0, PROD, "k")
        store.upload(archive(tmp_path, f"a{i}", 1000), name)
        os.utime(tmp_path / "cache" / name, (0, time.time() - 100 + i))
    assert cache.collect_total() == 2
    kept = sorted(o.name.split("/")[0] for o in store.listing("") if o.name.endswith(".tar.gz"))
    assert kept == ["p2", "p3"]  # the two most recently used
    # A save collects it too.
    cache.save("p9", 0, "k", PROD, archive(tmp_path, "a9", 1000))
    archives = [o for o in store.listing("") if o.name.endswith(".tar.gz")]
    assert sum(o.size for o in archives) <= 2500
    assert object_name("p9", 0, PROD, "k") in [o.name for o in archives]
