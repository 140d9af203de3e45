"""The router's own time as its Prometheus histograms count it, for `baton bench serve`.

The router times itself per request (`baton:router_admission_seconds`: received to worker call;
`baton:router_added_ttft_seconds`: that plus the first token's relay) and per chunk
(`baton:router_relay_seconds`: worker chunk in to client write). A benchmark scrapes `/metrics`
before and after a stretch of load and reads quantiles off the difference, as Prometheus's
`histogram_quantile` does (linear within a bucket), so a figure is as fine as the buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from baton.errors import EngineError

PHASES = ("added_ttft", "admission", "relay")


@dataclass(slots=True)
class PhaseCounts:
    """One phase's histogram as scraped: cumulative counts by upper bound, sum and count."""

    buckets: dict[float, float] = field(default_factory=dict)
    total_s: float = 0.0
    count: float = 0.0

    def since(self, before: PhaseCounts) -> PhaseCounts:
        return PhaseCounts({le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
                           self.total_s - before.total_s, self.count - before.count)


Scrape = dict[str, PhaseCounts]  # phase -> its histogram


def parse(text: str) -> Scrape:
    """The router-time histograms in a Prometheus text exposition (all model labels summed)."""
    out = {p: PhaseCounts() for p in PHASES}
    names = {f"baton:router_{p}_seconds": p for p in PHASES}
    for family in text_string_to_metric_families(text):
        phase = names.get(family.name)
        if phase is None:
            continue
        h = out[phase]
        for s in family.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                h.buckets[le] = h.buckets.get(le, 0.0) + s.value
            elif s.name.endswith("_sum"):
                h.total_s += s.value
            elif s.name.endswith("_count"):
                h.count += s.value
    return out


async def scrape(url: str, token: str | None = None) -> Scrape:
    """GET `url` (a router's `/metrics`) and parse it; raises `EngineError` if it fails."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise EngineError(f"{url} answered {resp.status}: {text[:200]}")
    return parse(text)


def quantile(q: float, h: PhaseCounts) -> float | None:
    """The `q` quantile (0..1) of a histogram, linear within its bucket (None when empty); a
    rank in the +Inf bucket reads as the highest finite bound."""
    bounds = sorted(h.buckets)
    total = h.buckets.get(math.inf, h.count)
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        n = h.buckets[le]
        if n >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * ((rank - below) / (n - below) if n > below else 1.0)
        lower, below = le, n
    return lower


def summary(before: Scrape, after: Scrape) -> dict[str, Any]:
    """Per phase, what was observed between two scrapes: count, mean, p50 and p99 in ms."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        h = after[phase].since(before[phase])
        p50, p99 = quantile(0.5, h), quantile(0.99, h)
        out[phase] = {"count": int(h.count),
                      "mean_ms": h.total_s / h.count * 1000 if h.count else None,
                      "p50_ms": None if p50 is None else p50 * 1000,
                      "p99_ms": None if p99 is None else p99 * 1000}
    return out
