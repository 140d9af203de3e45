"""`baton bench spec` on a tiny model: every method times the same text as `none`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKLOAD = [
    {"task": "quote", "max_tokens": 24,
     "prompt": "one two three four five six seven eight nine ten one two three four five six "
               "seven eight nine ten one two three"},
    {"task": "quote", "prompt": "alpha beta gamma delta alpha beta gamma delta alpha beta",
     "max_tokens": 16},
    {"task": "chat", "messages": [{"role": "user", "content": "Say something."}],
     "max_tokens": 12},
]


def test_bench_spec_reports_every_method_per_family_on_the_same_text(tmp_path: Path) -> None:
    workload = tmp_path / "w.jsonl"
    workload.write_text("\n".join(json.dumps(row) for row in WORKLOAD) + "\n")
    out = tmp_path / "spec.json"
    baton = str(Path(sys.executable).parent / "baton")
    res = subprocess.run([baton, "bench", "spec", "--model", "tiny:llama", "--dtype", "float32",
                          "--methods", "ngram,lookahead", "--workload", str(workload),
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["methods"] == ["none", "ngram", "lookahead"]
    assert set(report["families"]) == {"quote", "chat"}
    for family in report["families"].values():
        for method, row in family.items():
            # float32 and greedy: every method is lossless, so each timed none's own tokens.
            assert row["identical_to_none"] == 1.0, (method, row)
            assert row["speedup"] == pytest.approx(row["tok_s"] / family["none"]["tok_s"])
    per_request = report["per_request_bs1"]
    assert len(per_request) == len(WORKLOAD)
    for request, row in zip(WORKLOAD, per_request, strict=True):
        assert set(row) == set(report["methods"])
        assert 0 < row["none"]["tokens"] < request["max_tokens"]  # those after the first
        # none: one pass per token; the others drafted, and never took more passes than none.
        assert row["none"]["drafted"] == 0 and row["none"]["passes"] == row["none"]["tokens"] + 1
        assert all(r["passes"] <= row["none"]["passes"] for r in row.values())
        # Prompt lookup drafts a continuation from the text, never a better one than the oracle.
        assert row["none"]["lookup_oracle_passes"] <= row["ngram"]["passes"] - 1
    oracle = report["ratios"]["lookup_oracle_tokens_per_pass"]
    assert set(oracle) == {"quote", "chat"}
    for family, tokens_per_pass in oracle.items():
        assert tokens_per_pass >= report["families"][family]["ngram"]["tokens_per_pass"] >= 1
    assert set(report["ratios"]["speedup_c16"]) == set(report["methods"])
    assert report["ratios"]["speedup_c16"]["none"] == 1.0


def test_a_draft_model_or_heads_given_are_timed_beside_the_methods_named() -> None:
    """`--medusa-heads` (or `--draft-model`) with the default `--methods` compares them too;
    `none` comes first once, whatever the list says."""
    from baton.ops.bench.spec import bench_methods

    default = ["ngram", "lookahead", "layerskip"]
    assert bench_methods(default, None, "heads") == ["none", *default, "medusa"]
    assert bench_methods(["ngram"], "draft-dir", None) == ["none", "ngram", "draft"]
    assert bench_methods(["medusa", "none"], None, "heads") == ["none", "medusa"]
    assert bench_methods(default, None, None) == ["none", *default]
