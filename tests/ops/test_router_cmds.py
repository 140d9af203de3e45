"""What `baton router stats` and `baton router quality` compute from what they read."""

from __future__ import annotations

import time

from baton.ops.router_cmds import selection_stats, token_agreement
from baton.records import PerfRecord


def rec(method: str, tps: float, by: str = "selector", predicted: float | None = None,
        explored: bool = False, prompt: int = 100) -> PerfRecord:
    return PerfRecord(method=method, prefill_path="local", tpot_s=1 / tps, output_tokens=32,
                      prompt_tokens=prompt, selected_by=by, explored=explored,
                      predicted_tokens_per_s=predicted)


def test_stats_compare_predicted_and_achieved_speed_per_method():
    records = [rec("ngram", 30, predicted=33), rec("ngram", 30, predicted=27),
               rec("none", 20, predicted=20, explored=True), rec("none", 20, by="request")]
    info = {"version": 3, "trained_at": time.time() - 120, "records": 500}
    out = selection_stats(records, info)
    assert out["model_version"] == 3 and 119 < out["model_age_s"] < 200
    assert out["selected"] == 3 and out["by_request"] == {"none": 1}
    assert out["methods"]["ngram"] == {"chosen": 2, "explored": 0, "predicted_tok_s": 30.0,
                                       "achieved_tok_s": 30.0}
    assert out["exploration_share"] == 1 / 3
    assert 0.05 < out["mean_abs_log_error"] < 0.1
    # The explored `none` pick ran at 20 where ngram ran at 30 on prompts of that length.
    assert abs(out["estimated_regret"] - (1 / 3) / 3) < 1e-9


def test_stats_without_a_model_or_choices():
    out = selection_stats([rec("none", 20, by="request")], None)
    assert out["model_version"] == 0 and out["model_age_s"] is None
    assert out["selected"] == 0 and out["estimated_regret"] is None


def test_agreement_counts_the_tokens_before_the_first_difference():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert token_agreement(ref, ref) == 1.0
    assert token_agreement(ref, [[1, 2, 9, 4], [5, 6, 7, 8]]) == (0.5 + 1.0) / 2
    assert token_agreement(ref, [[1, 2], [0]]) == (0.5 + 0.0) / 2
