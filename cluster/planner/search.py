"""Goodput of a layout under SLOs, and the search over layouts for the most goodput per dollar.

Goodput follows DistServe (as `baton bench` does): the highest request rate at which at least
`attainment` of requests meet both the TTFT and the TPOT SLO. It is found by simulating one fixed
sample of requests (common random numbers: the same lengths and the same exponential gaps, scaled
by the rate) at a bracket of rates, then bisecting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from baton.cluster.planner.layout import Layout
from baton.cluster.planner.sim import ClusterSim, SimResult, Speculation
from baton.cluster.planner.workload import Lengths
from baton.errors import PlanError

log = logging.getLogger(__name__)

BISECT_STEPS = 6
MAX_DOUBLINGS = 12


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


@dataclass(frozen=True, slots=True)
class Evaluated:
    """A layout's goodput (requests/s within the SLOs) and what its run at that rate saw."""

    layout: Layout
    goodput_rps: float
    ttft_p50_s: float
    tpot_p50_s: float

    @property
    def price_per_hour(self) -> float:
        return self.layout.price_per_hour

    @property
    def per_dollar(self) -> float:
        """Requests per second within the SLOs per dollar-hour."""
        return self.goodput_rps / self.price_per_hour if self.price_per_hour else 0.0


class Bench:
    """One workload sample under one SLO: attainment of a layout at a rate (with an
    acceleration method, as measured, for a share of the requests)."""

    def __init__(self, workload: Lengths, slo: SLO, num_requests: int, seed: int,
                 speculation: Speculation | None = None):
        rng = np.random.default_rng(seed)
        self.workload = workload
        self.slo = slo
        self.speculation = speculation
        self.seed = seed
        self.prompts, self.outputs = workload.sample(num_requests, rng)
        gaps = rng.exponential(1.0, num_requests)
        gaps[0] = 0.0
        self.unit_arrivals = np.cumsum(gaps)  # at 1 request/s
        self.mean_prompt = float(self.prompts.mean())
        self.mean_output = float(self.outputs.mean())

    def run(self, layout: Layout, rate: float) -> SimResult:
        sim = ClusterSim(layout.replica_specs(), layout.prefill_threshold,
                         speculation=self.speculation, seed=self.seed)
        return sim.run(self.unit_arrivals / rate, self.prompts, self.outputs)

    def meets(self, layout: Layout, rate: float) -> tuple[bool, SimResult]:
        res = self.run(layout, rate)
        return res.attainment(self.slo.ttft_s, self.slo.tpot_s) >= self.slo.attainment, res

    def guess(self, layout: Layout) -> float:
        """A first rate to try: what the pools could sustain if never idle."""
        prefill = decode = 0.0
        p, o = self.mean_prompt, self.mean_output
        for pool in layout.pools:
            c = pool.cost
            t_prompt = c.iteration(int(p), p * p / 2, 0, 0.0)
            batch = min(pool.max_num_seqs, 32)
            t_tokens = o * c.iteration(0, 0.0, batch, batch * (p + o / 2)) / batch
            if pool.role == "both":
                prefill += pool.replicas / (t_prompt + t_tokens)
                decode += pool.replicas / (t_prompt + t_tokens)
            elif pool.role == "prefill":
                prefill += pool.replicas / t_prompt
            else:
                decode += pool.replicas / t_tokens
        if not any(pl.role == "prefill" for pl in layout.pools):
            return decode
        return min(prefill, decode) if prefill else decode

    def goodput(self, layout: Layout) -> Evaluated:
        """The layout's goodput (0 when even a trickle misses the SLOs)."""
        rate = max(self.guess(layout), 1e-3)
        ok, res = self.meets(layout, rate)
        good: tuple[float, SimResult] | None = (rate, res) if ok else None
        bad = None if ok else rate
        for _ in range(MAX_DOUBLINGS):
            if good is not None and bad is not None:
                break
            rate = rate * 2 if bad is None else rate / 2
            ok, res = self.meets(layout, rate)
            if ok:
                good = (rate, res)
            else:
                bad = rate
        if good is None:
            return Evaluated(layout, 0.0, math.nan, math.nan)
        if bad is not None:
            lo, hi = good[0], bad
            for _ in range(BISECT_STEPS):
                mid = math.sqrt(lo * hi)
                ok, res = self.meets(layout, mid)
                if ok:
                    lo, good = mid, (mid, res)
                else:
                    hi = mid
        rate, res = good
        return Evaluated(layout, rate, res.p50(res.ttft), res.p50(res.tpot))


def search(layouts: Iterable[Layout], bench: Bench, budget: float | None = None,
           progress: Callable[[Evaluated], None] | None = None) -> list[Evaluated]:
    """Every layout within `budget` ($/h) evaluated, best goodput per dollar first.

    `PlanError` when none is within the budget or none meets the SLOs at any rate."""
    considered = [lay for lay in layouts if budget is None or lay.price_per_hour <= budget]
    if not considered:
        raise PlanError(f"no layout costs at most ${budget:.2f}/h; raise --budget or add "
                        "cheaper GPUs (--gpus)")
    out = []
    for lay in considered:
        ev = bench.goodput(lay)
        out.append(ev)
        if progress is not None:
            progress(ev)
    out.sort(key=lambda e: e.per_dollar, reverse=True)
    if out[0].goodput_rps <= 0:
        slo = bench.slo
        raise PlanError(f"no layout meets TTFT <= {slo.ttft_s:g} s and TPOT <= "
                        f"{slo.tpot_s * 1000:g} ms for {slo.attainment:.0%} of requests even at "
                        "a trickle; relax the SLOs, or allow faster GPUs (--gpus)")
    return out


def cheapest_for_rate(ranked: list[Evaluated], bench: Bench, rate: float,
                      candidates: int = 3) -> tuple[Layout, SimResult]:
    """The cheapest multiple of a ranked layout that meets the SLOs at `rate`, verified by
    simulating it at that rate (the `candidates` most cost-efficient layouts are tried)."""
    best: tuple[Layout, SimResult] | None = None
    for ev in [e for e in ranked if e.goodput_rps > 0][:candidates]:
        k = max(1, math.ceil(rate / ev.goodput_rps))
        for kk in (k, k + 1, 2 * k):
            lay = ev.layout.scaled(kk)
            if best is not None and lay.price_per_hour >= best[0].price_per_hour:
                break
            ok, res = bench.meets(lay, rate)
            if ok:
                best = (lay, res)
                break
    if best is None:
        raise PlanError(f"no layout tried meets the SLOs at {rate:g} requests/s; lower --rate "
                        "or relax the SLOs")
    return best
