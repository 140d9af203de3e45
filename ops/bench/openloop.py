"""Open-loop load: requests arrive on a Poisson schedule whatever the system's state, and goodput.

Each request's clock starts at its scheduled arrival, not when the client got around to sending
it, so a system that falls behind pays for its queue in TTFT. Goodput follows DistServe: the
highest request rate at which at least `attainment` of requests meet both the TTFT and the TPOT
SLO (TPOT per request: seconds between its first and last token over the tokens in between).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from baton.ops.bench.workload import BenchRequest, RequestTiming
from baton.stats import percentile, tpot

# One request of the load: (index, request) -> its outputs as they stream (cumulative token ids).
Send = Callable[[int, BenchRequest], AsyncIterator[Any]]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Offsets in seconds of `n` arrivals at `rate` per second (exponential gaps), from 0."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def met(self, t: RequestTiming) -> bool:
        return t.ttft <= self.ttft_s and (t.tpot is None or t.tpot <= self.tpot_s)


async def _one(send: Send, i: int, req: BenchRequest, start: float) -> RequestTiming:
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    first = last = None
    tokens = 0
    async for out in send(i, req):
        n = len(out.token_ids)
        if n > tokens:
            last = time.perf_counter()
            first = first or last
            tokens = n
    if first is None or last is None:
        raise RuntimeError(f"request {i} ended without a token")
    return RequestTiming(ttft=first - start, tpot=tpot(first, last, tokens), tokens=tokens)


async def run_open_loop(send: Send, requests: Sequence[BenchRequest],
                        arrivals: Sequence[float]) -> tuple[list[RequestTiming], float]:
    """Send every request at its arrival offset; (timings in request order, wall seconds)."""
    t0 = time.perf_counter() + 0.05
    timings = await asyncio.gather(*(_one(send, i, r, t0 + a)
                                     for i, (r, a) in enumerate(zip(requests, arrivals,
                                                                    strict=True))))
    return list(timings), time.perf_counter() - t0


def summarize(timings: Sequence[RequestTiming], wall_s: float, slo: SLO) -> dict[str, Any]:
    ttfts = [t.ttft for t in timings]
    tpots = [t.tpot for t in timings if t.tpot is not None]
    return {
        "num_requests": len(timings),
        "attainment": sum(slo.met(t) for t in timings) / len(timings),
        "ttft_attainment": sum(t.ttft <= slo.ttft_s for t in timings) / len(timings),
        "tpot_attainment": sum(t.tpot is None or t.tpot <= slo.tpot_s for t in timings)
        / len(timings),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50), "tpot_p99_s": percentile(tpots, 99),
        "output_tok_s": sum(t.tokens for t in timings) / wall_s,
        "wall_s": wall_s,
    }


def run_record(timings: Sequence[RequestTiming], wall_s: float, slo: SLO,
               requests: Sequence[BenchRequest], long_prompt_tokens: int) -> dict[str, Any]:
    """One system's run at one rate, as a report keeps it: the summary, every request's timing,
    prompt length and asked-for length, how many prompts were long, and how busy the machine
    was."""
    s = summarize(timings, wall_s, slo)
    s["timings"] = [(t.ttft, t.tpot, t.tokens) for t in timings]
    s["prompt_tokens"] = [len(r.prompt_ids) for r in requests]
    s["max_tokens"] = [r.max_tokens for r in requests]
    s["long_requests"] = sum(len(r.prompt_ids) >= long_prompt_tokens for r in requests)
    # Runnable processes over the last minute: above ~2 (both cores busy with this run) means
    # something else competed for the cores.
    s["load_average_1m"] = os.getloadavg()[0]
    return s


def goodput(by_rate: dict[float, dict[str, Any]], attainment: float) -> float:
    """The highest rate whose run met the SLOs for `attainment` of requests, every lower rate
    run meeting them too (0.0 when even the lowest rate fell short)."""
    best = 0.0
    for rate in sorted(by_rate):
        if by_rate[rate]["attainment"] < attainment:
            break
        best = rate
    return best
