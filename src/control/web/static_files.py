"""Static assets under a content-hashed prefix: /static/<hash>/<path>.

The hash covers every file of the static tree, so one release's URLs never
serve another release's bytes and browsers may cache them for a year. The
JavaScript modules import each other by relative paths, which stay under
the same prefix.
"""

from __future__ import annotations

import hashlib
import mimetypes
from importlib import resources
from importlib.abc import Traversable

from aiohttp import web

IMMUTABLE = "public, max-age=31536000, immutable"
TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


class StaticFiles:
    """Reads the package's ``static`` tree once at start and serves it from
    memory (it is a few tens of kilobytes)."""

    def __init__(self) -> None:
        root = resources.files("control.web") / "static"
        self.files: dict[str, bytes] = {}
        _walk(root, "", self.files)
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name] + b"\0")
        self.version = digest.hexdigest()[:16]
        self.prefix = f"/static/{self.version}/"

    def url(self, path: str) -> str:
        """The URL of ``path`` (relative to the static tree); raises
        ``KeyError`` for a file that does not exist, so a typo in a template
        fails its first render in the tests."""
        if path not in self.files:
            raise KeyError(f"no static file {path!r}")
        return self.prefix + path

    async def serve(self, request: web.Request) -> web.Response:
        """GET /static/{version}/{path}: the file with a year of caching, or
        404 for an unknown path or another release's version."""
        path = request.match_info["path"]
        body = self.files.get(path)
        if body is None or request.match_info["version"] != self.version:
            raise web.HTTPNotFound(text="no such static file")
        suffix = path[path.rfind(".") :]
        content_type = TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "text/plain"
        etag = f'"{self.version}"'
        headers = {"Cache-Control": IMMUTABLE, "ETag": etag}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=content_type, headers=headers)


def _walk(folder: Traversable, prefix: str, out: dict[str, bytes]) -> None:
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            _walk(entry, name + "/", out)
        elif not entry.name.startswith("."):
            out[name] = entry.read_bytes()
