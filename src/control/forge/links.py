"""The URLs Conveyor hands out: a build's page (a commit status links to
it) and a deploy hook's URL."""

from __future__ import annotations


class Links:
    """``base`` is ``CONVEYOR_PUBLIC_URL``; the composition root sets it to
    the HTTP side's own address once bound when no public URL is given."""

    def __init__(self, base: str = "") -> None:
        self.base = base.rstrip("/")

    def build(self, build_id: str) -> str:
        return f"{self.base}/builds/{build_id}" if self.base else ""

    def deploy_hook(self, key: str) -> str:
        return f"{self.base}{hook_path(key)}" if self.base else hook_path(key)


def hook_path(key: str) -> str:
    return f"/hooks/deploy/{key}"
