"""`baton bench select`'s scoring on a candidate matrix whose answers are known: prompt lookup
pays on prompts that repeat themselves (at batch 1 only), and nothing else pays."""

from __future__ import annotations

import random

import pytest
from rich.console import Console

from baton.ops.bench.select_eval import evaluate, score
from baton.router.speed_model import TrainingSettings
from tests.router import selector_world as world

METHODS = ["none", "ngram"]


def matrix(families: range, per_family: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for fam in families:
        copying = 0.9 if fam % 2 else 0.0  # odd families repeat themselves
        for _ in range(per_family):
            ids = world.prompt(fam, copying, rng)
            f = world.features(fam, copying, random.Random(len(rows)))
            rows.append({"task": f"family{fam}", "prompt_tokens": len(ids), "max_tokens": 64,
                         "ids": ids, "features": f.as_dict(),
                         "tps": {"bs1": {m: world.speed(m, f) for m in METHODS},
                                 "c16": {m: world.speed(m, f, in_flight=3.0) / 4
                                         for m in METHODS}}})
    return rows


def test_scores_are_decode_time_ratios_and_the_oracle_bounds_them():
    rows = matrix(range(2), 3)
    none = score(rows, "bs1", ["none"] * len(rows))
    assert none["speedup"] == 1.0
    oracle = [max(r["tps"]["bs1"], key=r["tps"]["bs1"].get) for r in rows]
    best = score(rows, "bs1", oracle)
    assert best["accuracy"] == 1.0 and best["speedup"] > 1.0
    worst = [("ngram" if p == "none" else "none") for p in oracle]
    assert score(rows, "bs1", worst)["speedup"] < 1.0


def test_the_selector_finds_what_pays_on_families_it_was_not_trained_on(tmp_path):
    pytest.importorskip("matplotlib")
    rows = matrix(range(4), 6)
    report = evaluate(rows, None, METHODS, Console(quiet=True), plot_path=tmp_path / "r.png",
                      settings=TrainingSettings(members=2, steps=150))
    bs1 = report["modes"]["bs1"]
    assert bs1["best_fixed"] == "ngram"  # half the families gain a lot, half lose a little
    speed = bs1["overall"]["speedup"]
    assert speed["oracle"] >= max(v for k, v in speed.items() if k != "oracle")
    # Held out, a repeating family still gets ngram and a plain one none.
    assert bs1["share_of_oracle"] > 0.9 and bs1["accuracy"] >= 0.8
    assert bs1["vs_best_fixed"] > 1.0
    assert report["ratios"]["accuracy"] == min(m["accuracy"] for m in report["modes"].values())
    assert report["selection_ms_p50"] > 0
    online = report["online"]
    assert online["requests"] == 3 * len(rows)
    assert online["explored"] <= 0.05 * online["requests"] + 1
    assert (tmp_path / "r.png").stat().st_size > 0
