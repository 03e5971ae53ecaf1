"""The one table the benchmark prints, and docs/benchmarks.md.

The document is generated whole by `python -m bench`: the figures, the
command that made them, the machine, and each part's method (the docstring
of the module that measures it), so that the method and the numbers cannot
drift apart.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.figures import Figure

COLUMNS = ("Part", "Figure", "Conveyor", "Target", "Met", "Buildbot 4.3", "Ratio", "Note")


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu: str
    memory_gb: float
    kernel: str
    python: str
    postgres: str
    date: str
    commit: str
    load: str

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("cores (nproc)", str(self.cores)),
            ("CPU", self.cpu),
            ("memory", f"{self.memory_gb:.1f} GB"),
            ("kernel", self.kernel),
            ("Python", self.python),
            ("PostgreSQL", self.postgres),
            ("date (UTC)", self.date),
            ("git commit", self.commit),
            ("load average (1, 5, 15 min)", self.load),
        ]


def machine(code: str, postgres_version: str, load_at_start: tuple[float, ...]) -> Machine:
    """Facts about this machine and the code under test; the load average is
    given at the start and the end of the run (other work on the machine
    slows every figure)."""
    cpu = "unknown"
    memory = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return Machine(
        cores=len(os.sched_getaffinity(0)),
        cpu=cpu,
        memory_gb=memory,
        kernel=platform.release(),
        python=platform.python_version(),
        postgres=postgres_version,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        commit=code,
        load=f"start {_load(load_at_start)}; end {_load(os.getloadavg())}",
    )


def exported(repo: Path, ref: str, into: Path) -> tuple[Path, str]:
    """Export ``ref``'s src/ into ``into`` (git archive; the repository is
    not changed); return (the src directory, the full commit id). Raises
    ``RuntimeError`` for a ref git does not know."""
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if sha.returncode != 0:
        raise RuntimeError(f"git does not know the commit {ref!r}: {sha.stderr.strip()}")
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", sha.stdout.strip(), "src"],
        capture_output=True, check=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src", sha.stdout.strip()


def _load(values: tuple[float, ...]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def code_under_test(repo: Path) -> str:
    """HEAD, and whether the code measured differs from it: uncommitted
    changes in src/, or code imported from elsewhere (PYTHONPATH). Call it
    at the start of a run: commits may land while it runs."""
    import control

    imported = Path(control.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if imported != (repo / "src").resolve():
        return f"{head} (code imported from {imported})"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    return f"{head} (with uncommitted changes in src/)" if dirty else head


def _cells(f: Figure) -> tuple[str, ...]:
    return (
        f.part,
        f.name,
        f.value_text(),
        f.target_text(),
        f.met_text(),
        f.peer_text(),
        f.ratio_text(),
        f.note,
    )


def table(figures: Sequence[Figure]) -> str:
    """The figures as an aligned plain-text table."""
    rows = [COLUMNS, *(_cells(f) for f in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown(
    figures: Sequence[Figure],
    failures: Sequence[str],
    command: str,
    host: Machine,
    methods: Sequence[tuple[str, str]],
    peer_note: str,
) -> str:
    """docs/benchmarks.md: how it was run, on what, the figures, the
    comparison with Buildbot, the missed targets and each part's method."""
    out = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench` (the `bench/` package); do not edit by hand,"
        " run the benchmark again. Targets are those of issue 7 for a 2-core build"
        " machine; against Buildbot, ratios are what count.",
        "",
        "## How to run",
        "",
        "`.venv/bin/python -m bench --peer` runs every part at the issue's sizes and then"
        " Buildbot (its harness installs Buildbot from PyPI on first use), prints the table"
        " and rewrites this file; it takes about a quarter of an hour on 2 cores."
        " `--quick` is a smoke run with small sizes, `--parts push,burst` selects parts,"
        " `--profile DIR` writes py-spy profiles of the Conveyor processes, `--json FILE`"
        " keeps every raw number. Other work on the machine slows every figure: the load"
        " average below says how busy it was.",
        "",
        "These figures were made with:",
        "",
        "```",
        command,
        "```",
        "",
        "| Machine | |",
        "| --- | --- |",
        *(_md_row(r) for r in host.rows()),
        "",
        "## Figures",
        "",
        _md_row(COLUMNS),
        _md_row(["---"] * len(COLUMNS)),
        *(_md_row(_cells(f)) for f in figures),
        "",
        "Ratio: how many times better Conveyor's figure is than Buildbot's"
        " (Buildbot's time ÷ Conveyor's, or Conveyor's rate ÷ Buildbot's).",
        "",
    ]
    compared = [f for f in figures if f.ratio is not None]
    out += ["## Conveyor and Buildbot", ""]
    if compared:
        out += [
            f"- {f.name}: Conveyor {f.value_text()}, Buildbot {f.peer_text()}: {f.ratio_text()}."
            for f in compared
        ]
    out += ["", peer_note, ""]
    missed = [f for f in figures if f.met is False]
    out += ["## Targets missed", ""]
    out += [f"- {f.name}: {f.value_text()} (target {f.target_text()})." for f in missed] or [
        "None."
    ]
    if failures:
        out += ["", "## Parts that did not run to the end", ""]
        out += [f"- {failure}" for failure in failures]
    out += ["", "## Method", ""]
    for title, text in methods:
        out += [f"### {title}", "", text.strip(), ""]
    return "\n".join(out).rstrip() + "\n"
