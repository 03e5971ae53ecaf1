"""Figures: one measured number with its unit, its target and its peer.

Every part returns a list of ``Figure``; the report prints them as one table
and writes them to docs/benchmarks.md. Percentiles are nearest-rank (the
Buildbot harness uses the same rule, so the two sides compare).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]. Raises ``ValueError`` on no values."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, min, p50, p95, p99, max and mean of ``values`` (empty dict for none)."""
    if not values:
        return {}
    return {
        "n": float(len(values)),
        "min": min(values),
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


@dataclass(frozen=True)
class Target:
    """``value <op> bound``; ``op`` is "<=" or ">="."""

    op: str
    bound: float

    def met(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def text(self, unit: str) -> str:
        sign = "≤" if self.op == "<=" else "≥"
        return f"{sign} {_number(self.bound)} {unit}".strip()


def at_most(bound: float) -> Target:
    return Target("<=", bound)


def at_least(bound: float) -> Target:
    return Target(">=", bound)


@dataclass(frozen=True)
class Figure:
    """One row of the table. ``lower_is_better`` decides how the ratio to the
    peer reads; ``peer`` is Buildbot's figure measured in the same run."""

    part: str
    name: str
    value: float | None
    unit: str
    target: Target | None = None
    peer: float | None = None
    lower_is_better: bool = True
    note: str = ""
    # The key of the peer's figure this one compares with (bench.buildbot_peer).
    peer_key: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        return self.target.met(self.value)

    @property
    def ratio(self) -> float | None:
        """How many times better than the peer (> 1: Conveyor is better)."""
        if self.peer is None or self.value is None or self.value <= 0 or self.peer <= 0:
            return None
        return self.peer / self.value if self.lower_is_better else self.value / self.peer

    def value_text(self) -> str:
        return "n/a" if self.value is None else f"{_number(self.value)} {self.unit}".strip()

    def target_text(self) -> str:
        return self.target.text(self.unit) if self.target else ""

    def met_text(self) -> str:
        met = self.met
        return "" if met is None else ("met" if met else "MISSED")

    def peer_text(self) -> str:
        return "" if self.peer is None else f"{_number(self.peer)} {self.unit}".strip()

    def ratio_text(self) -> str:
        ratio = self.ratio
        return "" if ratio is None else f"{ratio:.1f}x better"


def _number(value: float) -> str:
    if value == int(value):
        return f"{value:,.0f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


@dataclass
class PartResult:
    """What one part measured: its table rows and its raw numbers (kept in
    the JSON output for anyone who wants to recompute a figure)."""

    name: str
    figures: list[Figure]
    raw: dict[str, Any] = field(default_factory=dict)
