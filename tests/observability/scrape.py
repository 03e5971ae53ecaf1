"""Read a Prometheus exposition the way Prometheus does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape, and the families it declared."""

    samples: dict[Key, float]
    families: frozenset[str]

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when absent (as a fresh
        counter or an unobserved histogram would be)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, tuple(sorted(labels.items()))) in self.samples

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every sample of ``name``, by label set."""
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def parse(text: str) -> Scrape:
    samples: dict[Key, float] = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(samples, frozenset(families))


async def scrape(url: str) -> Scrape:
    """GET ``url`` (a /metrics endpoint); fails unless it answers 200 with
    the Prometheus text format."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body = await response.text()
        assert response.status == 200, body
        assert response.headers["Content-Type"].startswith("text/plain"), response.headers
    return parse(body)


async def scrape_until(url: str, ok: Callable[[Scrape], bool], timeout: float = 10) -> Scrape:
    """Scrape until ``ok`` holds: a process records some metrics just after
    the state a test waits for (a runner counts a build after its final
    report was acknowledged)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = await scrape(url)
        if ok(metrics):
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never matched: {metrics.samples}")
        await asyncio.sleep(0.05)


async def get_json(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()
