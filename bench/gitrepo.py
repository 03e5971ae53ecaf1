"""A small local git repository the builds clone, and new commits on it.

Commits are made with plumbing (``commit-tree`` + ``update-ref``), which is
what a forge's push leaves behind: a new commit at the branch tip. They are
made before t0 is taken, like the Buildbot harness's ``git push``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
}


class Repo:
    """A repository on branch main with one file; the build user can read it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self._git("init", "-q", "-b", "main")
        (path / "README").write_text("bench\n")
        self._git("add", "-A")
        self._git("commit", "-q", "-m", "initial commit")
        self.tree = self._git("rev-parse", "HEAD^{tree}")
        self.tips: dict[str, str] = {"main": self._git("rev-parse", "HEAD")}
        self.open_up()

    def _git(self, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run(
            ["git", "-C", str(self.path), *args],
            check=True,
            capture_output=True,
            text=True,
            input=stdin,
            env={**os.environ, **GIT_ENV},
        )
        return out.stdout.strip()

    def open_up(self) -> None:
        """Builds run as an unprivileged user: let it read the repository
        and traverse the directories above it."""
        subprocess.run(["chmod", "-R", "a+rX", str(self.path)], check=True)
        for parent in self.path.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)

    def commit(self, branch: str, message: str) -> str:
        """A new commit on ``branch`` (created from main's tip if new);
        return its sha."""
        return self.commit_many([branch], message)[branch]

    def commit_many(self, branches: list[str], message: str) -> dict[str, str]:
        """One new commit on each branch, all refs updated at once."""
        shas: dict[str, str] = {}
        for branch in branches:
            parent = self.tips.get(branch, self.tips["main"])
            shas[branch] = self._git(
                "commit-tree", self.tree, "-p", parent, "-m", f"{message} ({branch})"
            )
        self._git(
            "update-ref", "--stdin",
            stdin="".join(f"update refs/heads/{b} {s}\n" for b, s in shas.items()),
        )  # fmt: skip
        self.tips.update(shas)
        # New objects are written 0444 under the umask; directories may be new.
        self.open_up()
        return shas

    def write(self, name: str, content: str, message: str) -> str:
        """Commit ``content`` as file ``name`` on main (the checked-out
        branch); later commits keep it. Returns the new sha."""
        (self.path / name).write_text(content)
        self._git("add", "-A")
        self._git("commit", "-q", "-m", message)
        self.tree = self._git("rev-parse", "HEAD^{tree}")
        self.tips["main"] = self._git("rev-parse", "HEAD")
        self.open_up()
        return self.tips["main"]
