"""`baton bench moe` on a tiny MoE model: every (budget, policy, batch) is measured against the
resident engine with cold expert files, gives the resident tokens, and the headline ratios the
issue's targets read are filled in."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
from rich.console import Console

from baton.errors import ConfigError
from baton.ops.bench import moe as bench
from baton.ops.bench import moe_grouping


def test_bench_moe_reports_every_budget_policy_and_batch(tmp_path):
    workload = tmp_path / "w.jsonl"
    workload.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                  ("The expert cache holds", "Routing locality")) + "\n")
    report = bench.run_moe_bench("tiny:mixtral", ["lru", "learned"], [0.25, 0.5], "disk",
                                 num_requests=2, max_tokens=4, threads=1, dtype="float32",
                                 device="cpu", workload=str(workload), predictor=None,
                                 console=Console(quiet=True))
    seen = {(r["budget"], r["policy"], r["batch"]) for r in report["rows"]}
    assert seen == {(b, p, n) for b in (0.25, 0.5) for p in ("lru", "learned")
                    for n in bench.BATCHES}
    for row in report["rows"]:
        # Cold files, fresh engines and a quarter of the experts at most: some experts load.
        assert row["bytes_loaded"] > 0 and row["misses"] > 0
        assert 0.0 <= row["hit_rate"] <= 1.0 and row["vs_resident"] > 0
    lru = [r for r in report["rows"] if r["policy"] == "lru"]
    assert all(r["prefetches_issued"] == 0 for r in lru)  # LRU never predicts
    ratios = report["ratios"]
    assert ratios["best_predictive_policy_at_25pct"] == "learned"
    # No predictor given: one was trained first, and its held-out scores are in the report.
    assert report["predictor_training"]["model"] == "tiny:mixtral"
    assert ratios["best_vs_lru_at_25pct"] > 0 and 0 <= ratios["hit_rate_at_25pct"] <= 1
    console = Console(record=True, width=200, file=io.StringIO())
    bench.show(report, console)
    assert "against all-resident" in console.export_text()


def test_bench_moe_refuses_an_unknown_policy():
    with pytest.raises(ConfigError, match="unknown policies"):
        bench.run_moe_bench("tiny:mixtral", ["mru"], [0.25], "host", 1, 4, 1, "float32", "cpu",
                            None, None, Console(quiet=True))


def test_grouping_puts_requests_that_use_the_same_experts_in_one_batch():
    code, prose = Counter({(0, 1): 5, (1, 2): 5}), Counter({(0, 3): 5, (1, 0): 4})
    vectors = [code, prose, code + Counter({(1, 3): 1}), prose, code]
    groups = moe_grouping.group_by_experts(vectors, batch=3)
    assert groups == [[0, 2, 4], [1, 3]]
    assert moe_grouping.mean_cosine(vectors, groups) > moe_grouping.mean_cosine(
        vectors, [[0, 1, 2], [3, 4]])


def test_bench_moe_grouping_serves_every_request_in_both_arrangements(tmp_path):
    workload = tmp_path / "w.jsonl"
    prompts = [f"Request {i} asks about experts number {i}" for i in range(8)]
    workload.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    report = bench.run_moe_bench("tiny:mixtral", ["lru"], [0.25], "disk", num_requests=1,
                                 max_tokens=3, threads=1, dtype="float32", device="cpu",
                                 workload=str(workload), predictor=None,
                                 console=Console(quiet=True), grouping=True)
    grouping = report["grouping"]
    assert grouping["policy"] == "lookahead" and grouping["requests"] == 8
    for arrangement in grouping["arrangements"].values():
        batches = arrangement["batches"]
        assert sorted(i for b in batches for i in b) == list(range(8))
        assert all(len(b) == bench.GROUPING_BATCH for b in batches)
        assert arrangement["mib_per_token"] > 0 and arrangement["tok_s"] > 0
    assert report["ratios"]["grouped_vs_shuffled_bytes"] > 0
    console = Console(record=True, width=200, file=io.StringIO())
    bench.show(report, console)
    assert "grouped against shuffled" in console.export_text()


def test_bench_moe_grouping_needs_two_batches_of_requests(tmp_path):
    workload = tmp_path / "w.jsonl"
    workload.write_text(json.dumps({"prompt": "only one"}) + "\n")
    with pytest.raises(ConfigError, match="--grouping needs at least 8 requests"):
        bench.run_moe_bench("tiny:mixtral", ["lru"], [0.25], "host", 1, 2, 1, "float32", "cpu",
                            str(workload), None, Console(quiet=True), grouping=True)
