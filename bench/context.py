"""What every part gets: a work directory and the shared PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.processes import Postgres


@dataclass(frozen=True)
class Context:
    """``profile_dir``: where py-spy profiles of the Conveyor processes go
    (None: no profiling)."""

    work_dir: Path
    postgres: Postgres
    profile_dir: Path | None = None

    def part_dir(self, name: str) -> Path:
        """A fresh directory for one part's repository, data and logs."""
        path = self.work_dir / name
        path.mkdir(parents=True, exist_ok=False)
        path.chmod(0o755)
        return path

    def profile(self, name: str) -> Path | None:
        """The profile path prefix of one part's processes, or None."""
        return self.profile_dir / name if self.profile_dir else None
