"""`baton bench actor`'s figures: TPOT as the caller saw it, tokens counted however they were
grouped into stream items, and the ratio of the two systems' medians."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from baton.ops.bench.actor import Run, _report
from baton.outputs import RequestMetrics, RequestOutput


def _run(arrivals: list[tuple[float, int]], finished_at: float) -> Run:
    tokens = sum(n for _, n in arrivals)
    final = RequestOutput("r", "", [], "", list(range(tokens)), True, "length",
                          RequestMetrics(arrival=0.0, first_token=0.0, finished=finished_at))
    return Run(arrivals, final)


def test_tpot_counts_tokens_not_stream_items_and_the_ratio_is_the_quotient():
    engine = [_run([(0.01 * i, 1) for i in range(5)], 0.04) for _ in range(3)]
    # The actor delivered 1 + 2 + 2 tokens in three items, the last one 3 ms after the engine.
    actor = [_run([(0.0, 1), (0.024, 2), (0.048 + 0.001 * k, 2)], 0.045) for k in range(3)]
    loop = {"steps": 15, "step_s": 0.15, "forward_s": 0.12, "calls_s": 0.0, "deliver_s": 0.015,
            "cpu_s": 0.14, "process_cpu_s": 0.17}
    alone = SimpleNamespace(step_s=0.12, forward_s=0.1)
    report = _report(alone, {"engine": engine, "actor": actor}, loop, 0.0, {"model": "m"})
    e, a = report["systems"]["engine"], report["systems"]["actor"]
    assert e["tpot_p50_s"] == pytest.approx(0.01)
    assert a["tpot_p50_s"] == pytest.approx(0.049 / 4)  # the median request's last arrival
    assert report["ratios"]["actor_vs_engine_tpot"] == pytest.approx(a["tpot_p50_s"]
                                                                     / e["tpot_p50_s"])
    assert a["tokens_per_item"] == pytest.approx(5 / 3)
    assert a["last_token_delivery_p50_s"] == pytest.approx(0.049 - 0.045)
    assert a["per_token_s"]["between_steps"] == pytest.approx(0.015 / 15)
    assert a["per_token_s"]["other_threads_cpu"] == pytest.approx(0.03 / 15)
    assert e["per_token_s"]["step"] == pytest.approx(0.12 / 15)
