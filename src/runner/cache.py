"""The build cache: archives of dependency directories, keyed by lock files.

Objects live at ``<project>/<generation>/<key>.tar.gz`` with a pointer
``<project>/<generation>/branch/<branch hash>`` naming the key a branch saved
last, so a build whose lock files changed restores the newest cache of the
production branch. A purge starts a new generation (the control plane bumps
it; old generations are collected). Entries expire after ``max_age_days``
and a project keeps at most ``max_project_bytes`` (oldest dropped first).

Two stores implement ``CacheStore``: a local directory (the default) and
S3-compatible object storage through boto3.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

DEFAULT_LOCKFILES = (
    "package-lock.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "poetry.lock",
    "uv.lock",
    "requirements*.txt",
    "Cargo.lock",
    "go.sum",
)
DEFAULT_PATHS = ("node_modules", ".venv", "vendor", ".cache/pip", "target")


@dataclass(frozen=True)
class CachePolicy:
    max_entry_bytes: int = 1024 * 1024 * 1024
    max_project_bytes: int = 4 * 1024 * 1024 * 1024
    max_age_days: float = 7.0


@dataclass(frozen=True)
class CacheObject:
    name: str
    size: int
    modified: float  # unix seconds


def object_name(project_id: str, generation: int, key: str) -> str:
    return f"{project_id}/{generation}/{key}.tar.gz"


def pointer_name(project_id: str, generation: int, branch: str) -> str:
    digest = hashlib.sha256(branch.encode()).hexdigest()[:32]
    return f"{project_id}/{generation}/branch/{digest}"


class CacheStore(Protocol):
    """Blocking object storage; callers run it in a thread. Methods raise
    ``OSError`` (or the backend's error) when the storage fails."""

    def download(self, name: str, dest: Path) -> bool:
        """Write object ``name`` to ``dest``; False when it does not exist."""
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

    def download(self, name: str, dest: Path) -> bool:
        src = self._path(name)
        if not src.is_file():
            return False
        shutil.copyfile(src, dest)
        os.utime(src)  # recently used: keep it longest
        return True

    def upload(self, src: Path, name: str) -> None:
        dest = self._path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".partial")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)

    def read_text(self, name: str) -> str | None:
        path = self._path(name)
        return path.read_text() if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(text)
        tmp.replace(path)

    def listing(self, prefix: str) -> list[CacheObject]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        out = []
        for path in base.rglob("*"):
            if path.is_file() and not path.name.endswith(".partial"):
                stat = path.stat()
                out.append(
                    CacheObject(str(path.relative_to(self.root)), stat.st_size, stat.st_mtime)
                )
        return out

    def delete(self, names: list[str]) -> None:
        for name in names:
            self._path(name).unlink(missing_ok=True)


class S3Cache:
    """Objects in an S3-compatible bucket (endpoint URL for MinIO, Ceph...)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "conveyor-cache") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def from_env(cls, env: dict[str, str]) -> S3Cache:
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

    def download(self, name: str, dest: Path) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(name), str(dest))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise
        return True

    def upload(self, src: Path, name: str) -> None:
        self.client.upload_file(str(src), self.bucket, self._key(name))

    def read_text(self, name: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise
        return str(reply["Body"].read().decode())

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
class Restored:
    key: str | None  # the key of the archive restored, or None
    fallback: bool = False
    bytes: int = 0


class BuildCache:
    """Restore and save one project's cache through a store, in threads."""

    def __init__(self, store: CacheStore, policy: CachePolicy | None = None) -> None:
        self.store = store
        self.policy = policy or CachePolicy()

    async def restore(
        self,
        project_id: str,
        generation: int,
        key: str,
        production_branch: str,
        dest: Path,
    ) -> Restored:
        """Fetch the archive for ``key`` (else the production branch's newest)
        into ``dest``."""
        return await asyncio.to_thread(
            self._restore, project_id, generation, key, production_branch, dest
        )

    def _restore(
        self, project_id: str, generation: int, key: str, production_branch: str, dest: Path
    ) -> Restored:
        if self.store.download(object_name(project_id, generation, key), dest):
            return Restored(key, False, dest.stat().st_size)
        fallback = self.store.read_text(pointer_name(project_id, generation, production_branch))
        if fallback and fallback != key:
            name = object_name(project_id, generation, fallback.strip())
            if self.store.download(name, dest):
                return Restored(fallback.strip(), True, dest.stat().st_size)
        return Restored(None)

    async def save(
        self, project_id: str, generation: int, key: str, branch: str, archive: Path
    ) -> str:
        """Store ``archive`` under ``key`` and point ``branch`` at it; return
        a sentence for the build log. Enforces the size policy."""
        return await asyncio.to_thread(self._save, project_id, generation, key, branch, archive)

    def _save(self, project_id: str, generation: int, key: str, branch: str, archive: Path) -> str:
        size = archive.stat().st_size
        if size > self.policy.max_entry_bytes:
            limit = self.policy.max_entry_bytes
            return f"cache not saved: {size} bytes is over the {limit}-byte limit"
        self.store.upload(archive, object_name(project_id, generation, key))
        self.store.write_text(pointer_name(project_id, generation, branch), key)
        removed = self.collect(project_id, generation)
        extra = f"; removed {removed} old entr{'y' if removed == 1 else 'ies'}" if removed else ""
        return f"cache saved: key {key[:16]}, {size} bytes{extra}"

    def collect(self, project_id: str, generation: int, now: float | None = None) -> int:
        """Drop other generations, expired entries, and the oldest entries
        past the project's size limit. Returns how many objects went."""
        now = time.time() if now is None else now
        objects = self.store.listing(f"{project_id}/")
        doomed = [o for o in objects if not o.name.startswith(f"{project_id}/{generation}/")]
        live = [o for o in objects if o.name.startswith(f"{project_id}/{generation}/")]
        cutoff = now - self.policy.max_age_days * 86400
        archives = sorted(
            (o for o in live if o.name.endswith(".tar.gz")), key=lambda o: o.modified, reverse=True
        )
        total = 0
        for obj in archives:
            if obj.modified < cutoff or total + obj.size > self.policy.max_project_bytes:
                doomed.append(obj)
            else:
                total += obj.size
        if doomed:
            self.store.delete([o.name for o in doomed])
        return len(doomed)


def lockfile_key(root: Path, patterns: tuple[str, ...]) -> str | None:
    """SHA-256 over the lock files matching ``patterns`` directly in ``root``;
    None when there is none.

    The files come from the build's repository, so symlinks and anything
    resolving outside ``root`` are skipped: the runner reads them with its
    own privileges.
    """
    digest = hashlib.sha256()
    found = False
    base = root.resolve()
    for path in sorted(_matches(root, patterns)):
        data = read_regular_file(path, base)
        if data is None:
            continue
        digest.update(path.name.encode() + b"\0")
        digest.update(data)
        found = True
    return digest.hexdigest() if found else None


def read_regular_file(path: Path, within: Path, limit: int = 64 * 1024 * 1024) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a symlink) inside
    ``within`` and at most ``limit`` bytes; else None."""
    try:
        if path.is_symlink() or within not in path.resolve().parents:
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        return handle.read(limit + 1)[:limit]


def _matches(root: Path, patterns: tuple[str, ...]) -> Iterator[Path]:
    for pattern in patterns:
        if "/" in pattern or pattern.startswith("."):
            continue
        yield from root.glob(pattern)
