"""Small statistics shared by the engine, the router's latency window and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def tpot(first: float | None, last: float | None, tokens: int) -> float | None:
    """Time per output token: seconds from the first token to the last over the tokens after the
    first; None before a first token or with fewer than two tokens."""
    if first is None or last is None or tokens < 2:
        return None
    return (last - first) / (tokens - 1)
