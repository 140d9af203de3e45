"""`baton bench moe` on a tiny MoE model: every (budget, policy, batch) is measured against the
resident engine with cold expert files, gives the resident tokens, and the headline ratios the
issue's targets read are filled in."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from baton.errors import ConfigError
from baton.ops.bench import moe as bench


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
