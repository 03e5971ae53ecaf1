"""The build cache: archives of dependency directories, keyed by lock files.

Objects live at ``<project>/<generation>/<scope>/<key>.tar.gz``, with a
pointer ``<project>/<generation>/<scope>/latest`` naming the key the scope
saved last. A scope is where a build may write: production builds write to
``production``, a pull request's builds to that request's scope, every
other build to its branch's scope. So a pull request (whose branch name a
fork chooses, "main" or "develop" as it likes) never puts an archive where
a production build or a push to one of the team's branches restores it.
A build restores, in order: its key in its scope, its key in production,
its scope's newest, production's newest.

A purge starts a new generation (the control plane bumps it; a save
collects the old ones). Entries expire ``max_age_days`` after their last
use (last save on S3) and a project keeps at most ``max_project_bytes``
(least recently used dropped first).

Two stores implement ``CacheStore``: a local directory (the default) and
S3-compatible object storage through boto3. The archives themselves are
made and unpacked inside the build's sandbox (see ``runner.cache_run``);
the runner only moves bytes, never reads a build's files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

log = logging.getLogger(__name__)

PRODUCTION_SCOPE = "production"


@dataclass(frozen=True)
class CachePolicy:
    max_entry_bytes: int = 1024 * 1024 * 1024
    max_project_bytes: int = 4 * 1024 * 1024 * 1024
    max_age_days: float = 7.0
    # All projects together: many projects must not fill the build host.
    max_total_bytes: int = 20 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class CacheObject:
    name: str
    size: int
    modified: float  # unix seconds


def scope_for(production: bool, branch: str, pull_request: int = 0) -> str:
    """The scope a build writes to (see the module docstring)."""
    if production:
        return PRODUCTION_SCOPE
    if pull_request:
        return f"pull-request-{pull_request}"
    return "branch-" + hashlib.sha256(branch.encode()).hexdigest()[:32]


def object_name(project_id: str, generation: int, scope: str, key: str) -> str:
    return f"{project_id}/{generation}/{scope}/{key}.tar.gz"


def pointer_name(project_id: str, generation: int, scope: str) -> str:
    return f"{project_id}/{generation}/{scope}/latest"


class CacheStore(Protocol):
    """Blocking object storage; callers run it in a thread. Methods raise
    ``OSError`` (or the backend's error) when the storage fails."""

    def open_read(self, name: str) -> tuple[IO[bytes], int] | None:
        """Object ``name`` opened for reading, and its size; None when it
        does not exist. The caller must close it."""
        ...

    def upload(self, src: Path, name: str) -> None: ...

    def read_text(self, name: str) -> str | None: ...

    def write_text(self, name: str, text: str) -> None: ...

    def listing(self, prefix: str) -> list[CacheObject]: ...

    def delete(self, names: list[str]) -> None: ...


class LocalDirCache:
    """Objects as files below ``root`` (one host's runners share it)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"object name {name!r} escapes the cache root")
        return path

    def open_read(self, name: str) -> tuple[IO[bytes], int] | None:
        try:
            handle = self._path(name).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            return None
        os.utime(handle.fileno())  # recently used: keep it longest
        return handle, os.fstat(handle.fileno()).st_size

    def upload(self, src: Path, name: str) -> None:
        dest = self._path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(dest)
        try:
            shutil.copyfile(src, tmp)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)

    def read_text(self, name: str) -> str | None:
        path = self._path(name)
        return path.read_text() if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _partial(path)
        try:
            tmp.write_text(text)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    def listing(self, prefix: str) -> list[CacheObject]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        out = []
        for path in base.rglob("*"):
            if path.name.endswith(".partial"):
                continue
            try:
                info = path.stat()
            except FileNotFoundError:
                continue  # collected meanwhile (another build, another runner)
            if stat.S_ISREG(info.st_mode):
                out.append(
                    CacheObject(str(path.relative_to(self.root)), info.st_size, info.st_mtime)
                )
        return out

    def delete(self, names: list[str]) -> None:
        for name in names:
            self._path(name).unlink(missing_ok=True)

    def sweep_partials(self, older_than: float = 86400.0) -> int:
        """Delete temporary files of saves that never finished (a runner
        killed mid-copy) older than ``older_than`` seconds; return how many."""
        stale_before = time.time() - older_than
        removed = 0
        for path in self.root.rglob("*.partial"):
            try:
                if path.stat().st_mtime < stale_before:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _partial(dest: Path) -> Path:
    """A temporary name beside ``dest``, unique to this write: two builds
    (or two runners sharing the directory) may save the same key at once,
    and each must rename a whole file of its own into place."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(6)}.partial")


class S3Cache:
    """Objects in an S3-compatible bucket (endpoint URL for MinIO, Ceph...)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "conveyor-cache") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Cache:
        """CONVEYOR_CACHE_S3_BUCKET (required), CONVEYOR_CACHE_S3_ENDPOINT,
        CONVEYOR_CACHE_S3_PREFIX; credentials the boto3 way (AWS_* variables,
        profiles, instance roles)."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=env.get("CONVEYOR_CACHE_S3_ENDPOINT") or None,
            region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
        return cls(
            client,
            env["CONVEYOR_CACHE_S3_BUCKET"],
            env.get("CONVEYOR_CACHE_S3_PREFIX", "conveyor-cache"),
        )

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _get(self, name: str) -> Any | None:
        """GetObject's reply for ``name``, or None when there is none."""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise

    def open_read(self, name: str) -> tuple[IO[bytes], int] | None:
        reply = self._get(name)
        return None if reply is None else (reply["Body"], int(reply["ContentLength"]))

    def upload(self, src: Path, name: str) -> None:
        self.client.upload_file(str(src), self.bucket, self._key(name))

    def read_text(self, name: str) -> str | None:
        reply = self._get(name)
        return None if reply is None else str(reply["Body"].read().decode())

    def write_text(self, name: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=text.encode())

    def listing(self, prefix: str) -> list[CacheObject]:
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for item in page.get("Contents", []):
                out.append(
                    CacheObject(
                        item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp()
                    )
                )
        return out

    def delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):
            chunk = names[start : start + 1000]
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._key(n)} for n in chunk], "Quiet": True},
            )


@dataclass(frozen=True)
class Found:
    """An archive a build may restore. ``exact`` when it was saved for the
    same key (same lock files), else it is a scope's newest."""

    name: str
    key: str
    exact: bool
    scope: str


class BuildCache:
    """Find, save and collect one store's archives. Methods block (network
    or disk): call them in a thread. They raise ``OSError`` or the store's
    error when the storage fails."""

    def __init__(self, store: CacheStore, policy: CachePolicy | None = None) -> None:
        self.store = store
        self.policy = policy or CachePolicy()

    def find(self, project_id: str, generation: int, key: str, scope: str) -> Found | None:
        """The archive to restore for ``key`` in ``scope``, or None."""
        scopes = [scope] if scope == PRODUCTION_SCOPE else [scope, PRODUCTION_SCOPE]
        # One listing per scope serves every candidate in it.
        names = {
            where: {o.name for o in self.store.listing(f"{project_id}/{generation}/{where}/")}
            for where in scopes
        }
        for where in scopes:
            name = object_name(project_id, generation, where, key)
            if name in names[where]:
                return Found(name, key, True, where)
        for where in scopes:
            latest = self.store.read_text(pointer_name(project_id, generation, where))
            latest = (latest or "").strip()
            if latest and latest != key:
                name = object_name(project_id, generation, where, latest)
                if name in names[where]:
                    return Found(name, latest, False, where)
        return None

    def save(self, project_id: str, generation: int, key: str, scope: str, archive: Path) -> str:
        """Store ``archive`` under ``key`` in ``scope`` and make it the
        scope's newest; return a sentence for the build log. Enforces the
        size policy and collects what it pushes out."""
        size = archive.stat().st_size
        if size > self.policy.max_entry_bytes:
            limit = self.policy.max_entry_bytes
            return f"cache not saved: {size} bytes is over the {limit}-byte limit"
        self.store.upload(archive, object_name(project_id, generation, scope, key))
        self.store.write_text(pointer_name(project_id, generation, scope), key)
        objects = self.store.listing("")
        doomed = self._project_doomed(objects, project_id, generation, time.time())
        gone = {o.name for o in doomed}
        doomed += self._total_doomed([o for o in objects if o.name not in gone])
        self._delete(doomed)
        removed = len(doomed)
        extra = f"; removed {removed} old entr{'y' if removed == 1 else 'ies'}" if removed else ""
        return f"cache saved: key {key[:16]}, {human_size(size)}{extra}"

    def collect_total(self) -> int:
        """Drop the least recently used archives of any project past the
        store's total limit. Returns how many went."""
        doomed = self._total_doomed(self.store.listing(""))
        self._delete(doomed)
        return len(doomed)

    def collect(self, project_id: str, generation: int, now: float | None = None) -> int:
        """Drop older generations, expired entries, and the least recently
        used entries past the project's size limit. Returns how many
        objects went. Newer generations stay: a build dispatched before a
        purge may save after it."""
        objects = self.store.listing(f"{project_id}/")
        doomed = self._project_doomed(
            objects, project_id, generation, time.time() if now is None else now
        )
        self._delete(doomed)
        return len(doomed)

    def _project_doomed(
        self, objects: list[CacheObject], project_id: str, generation: int, now: float
    ) -> list[CacheObject]:
        """Of ``objects``, those of ``project_id`` that ``collect`` drops."""
        mine = [o for o in objects if o.name.startswith(f"{project_id}/")]
        current = f"{project_id}/{generation}/"
        cutoff = now - self.policy.max_age_days * 86400
        older = [o for o in mine if _generation(o.name) < generation]
        live = [o for o in mine if o.name.startswith(current)]
        expired = [o for o in _archives_by_use(live) if o.modified < cutoff]
        fresh = [o for o in live if o not in expired]
        return older + expired + _over(fresh, self.policy.max_project_bytes)

    def _total_doomed(self, objects: list[CacheObject]) -> list[CacheObject]:
        return _over(objects, self.policy.max_total_bytes)

    def _delete(self, doomed: list[CacheObject]) -> None:
        if doomed:
            self.store.delete([o.name for o in doomed])


def _over(objects: list[CacheObject], budget: int) -> list[CacheObject]:
    """The archives among ``objects`` that do not fit in ``budget`` bytes
    once the most recently used are kept."""
    total = 0
    out = []
    for obj in _archives_by_use(objects):
        if total + obj.size > budget:
            out.append(obj)
        else:
            total += obj.size
    return out


def _archives_by_use(objects: list[CacheObject]) -> list[CacheObject]:
    """Archives among ``objects``, most recently used first."""
    return sorted(
        (o for o in objects if o.name.endswith(".tar.gz")), key=lambda o: o.modified, reverse=True
    )


def _generation(name: str) -> int:
    """The generation in an object name ``<project>/<generation>/...``."""
    try:
        return int(name.split("/")[1])
    except (IndexError, ValueError):
        return -1


def human_size(size: int) -> str:
    """``size`` bytes for a log line."""
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size} bytes"
