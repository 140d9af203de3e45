"""Scoring selection policies on a candidate matrix (see `select.py`).

A policy picks one method per request; its speedup is the decode time of all requests under `none`
over their decode time under its picks (time = output tokens / decode tokens/s, so long outputs
weigh more). Accuracy: the pick is the oracle's, or within 5% of the oracle's speed. The learned
selector is scored leave-one-family-out: for each family, a model trained on every other family's
rows picks for that family's requests, zero-shot (`selector`: exploration off, learning nothing)
and adapting (`selector_adapting`: learning from each outcome in turn, exploring within 5%).
Online: the selector starts from an empty history and serves a stream of the workload's requests
(three shuffled passes at batch 1), seeing only what its picks achieved, retraining its prior
every 32 outcomes as the router does in the background; its regret is the decode time it lost
against the oracle.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from baton.records import PerfRecord
from baton.router.features import RequestFeatures, request_features, tokenizer_flags
from baton.router.selector import MethodSelector
from baton.router.selector_training import NotEnoughHistory, train
from baton.router.speed_model import (
    NO_LOAD,
    Candidate,
    Load,
    TrainingSettings,
    load_features,
)

MODES = {"bs1": 1, "c16": 16}
WITHIN = 0.95  # a pick this close to the oracle's speed counts as right
ONLINE_PASSES = 3
RETRAIN_EVERY = 32
RULE_CODE_SHARE = 0.2  # the hand rule's "this prompt is code"

Pick = Callable[[dict[str, Any], str], str]


def load_of(mode: str) -> Load:
    """The load features the router would see: other requests in flight on the one worker."""
    return (math.log1p(MODES[mode] - 1), 0.0, 0.0)


def records(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[PerfRecord]:
    """Every (row, load, method) of a matrix as the performance record the router would write."""
    out = []
    for r in rows:
        for mode in MODES:
            for m in methods:
                tps = r["tps"][mode].get(m)
                if tps:
                    out.append(_record(r, mode, m, tps))
    return out


def _record(row: dict[str, Any], mode: str, method: str, tps: float) -> PerfRecord:
    return PerfRecord(method=method, prefill_path="local", pool="default", tpot_s=1.0 / tps,
                      output_tokens=row["max_tokens"], prompt_tokens=row["prompt_tokens"],
                      features={**row["features"], **load_features(load_of(mode))})


def _time(row: dict[str, Any], mode: str, method: str) -> float:
    return row["max_tokens"] / max(row["tps"][mode][method], 1e-9)


def score(rows: Sequence[dict[str, Any]], mode: str, picks: Sequence[str]) -> dict[str, float]:
    none = sum(_time(r, mode, "none") for r in rows)
    took = sum(_time(r, mode, p) for r, p in zip(rows, picks, strict=True))
    best = [max(r["tps"][mode].values()) for r in rows]
    right = sum(r["tps"][mode][p] >= WITHIN * b for r, p, b in zip(rows, picks, best, strict=True))
    return {"speedup": none / took, "accuracy": right / len(rows)}


def selector_picks(model_rows: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
                   mode: str, methods: Sequence[str], settings: TrainingSettings,
                   seed: int = 0) -> tuple[list[str], list[str]]:
    """Picks of a selector trained on `model_rows`: zero-shot (exploration off, learning
    nothing), and adapting (learning from each outcome in turn, exploring within 5%)."""
    model = train(records(model_rows, methods), settings, min_records=8)
    cands = [Candidate(m) for m in methods]
    load = {"default": load_of(mode)}
    frozen = MethodSelector(model, explore_rate=0.0)
    zero_shot = [frozen.choose(RequestFeatures.from_dict(r["features"]), cands,
                               load=load).candidate.method for r in rows]
    learning = MethodSelector(model, explore_rate=0.05, seed=seed)
    adaptive = []
    for r in rows:
        choice = learning.choose(RequestFeatures.from_dict(r["features"]), cands, load=load)
        learning.observe(choice, r["tps"][mode][choice.candidate.method])
        adaptive.append(choice.candidate.method)
    return zero_shot, adaptive


def rule_pick(row: dict[str, Any], mode: str, methods: Sequence[str]) -> str:
    """The rule an operator would write: speculate from the prompt when the request asks for its
    own material back or is code, and only while the pool is not busy."""
    f = row["features"]
    grounded = f["rewrite_cue"] > 0 or f["code_share"] >= RULE_CODE_SHARE
    for m in (("lookahead", "ngram") if grounded and MODES[mode] == 1 else ()):
        if m in methods:
            return m
    return "none"


def evaluate(rows: list[dict[str, Any]], train_rows: list[dict[str, Any]] | None,
             methods: list[str], console: Console, plot_path: Path | None = None,
             tokenizer: Any = None, seed: int = 0,
             settings: TrainingSettings | None = None) -> dict[str, Any]:
    settings = settings or TrainingSettings(seed=seed)
    families = sorted({r["task"] for r in rows})
    report: dict[str, Any] = {"modes": {}}
    for mode in MODES:
        picks: dict[str, list[str]] = {}
        picks["oracle"] = [max(r["tps"][mode], key=r["tps"][mode].get) for r in rows]
        fixed = {m: score(rows, mode, [m] * len(rows))["speedup"] for m in methods}
        best_fixed = max(fixed, key=fixed.__getitem__)
        picks["best_fixed"] = [best_fixed] * len(rows)
        picks["rule"] = [rule_pick(r, mode, methods) for r in rows]
        sel, adapt = [""] * len(rows), [""] * len(rows)
        for fam in families:
            held = [i for i, r in enumerate(rows) if r["task"] == fam]
            others = [r for r in rows if r["task"] != fam] + (train_rows or [])
            if train_rows is not None:  # the training workload alone: no family of the eval
                others = train_rows
            try:
                got, adapted = selector_picks(others, [rows[i] for i in held], mode, methods,
                                              settings, seed)
            except NotEnoughHistory:
                got = adapted = ["none"] * len(held)
            for i, p, a in zip(held, got, adapted, strict=True):
                sel[i], adapt[i] = p, a
        picks["selector"] = sel
        picks["selector_adapting"] = adapt
        result = _mode_report(rows, mode, methods, picks, fixed, best_fixed, families)
        report["modes"][mode] = result
        console.log(f"{mode}: selector {result['overall']['speedup']['selector']:.2f}x, oracle "
                    f"{result['overall']['speedup']['oracle']:.2f}x, best fixed {best_fixed}")
    report["online"] = online(rows, methods, settings, seed, plot_path)
    report["selection_ms_p50"] = selection_ms(rows, methods, tokenizer, settings)
    modes = report["modes"].values()
    keys = ("share_of_oracle", "share_of_oracle_gain", "vs_best_fixed", "accuracy")
    report["ratios"] = {k: min(m[k] for m in modes) for k in keys}
    report["ratios"]["by_mode"] = {mode: {k: res[k] for k in keys}
                                   for mode, res in report["modes"].items()}
    return report


def _mode_report(rows: list[dict[str, Any]], mode: str, methods: list[str],
                 picks: dict[str, list[str]], fixed: dict[str, float], best_fixed: str,
                 families: list[str]) -> dict[str, Any]:
    n = len(rows)
    overall = {p: score(rows, mode, ps) for p, ps in picks.items()}
    random_speedup = sum(_time(r, mode, "none") for r in rows) / sum(
        statistics.mean(_time(r, mode, m) for m in methods) for r in rows)
    speedup = {"random": random_speedup, **{p: v["speedup"] for p, v in overall.items()}}
    by_family = {}
    for fam in families:
        idx = [i for i in range(n) if rows[i]["task"] == fam]
        sub = [rows[i] for i in idx]
        by_family[fam] = {
            "speedup": {"random": sum(_time(r, mode, "none") for r in sub) / sum(
                statistics.mean(_time(r, mode, m) for m in methods) for r in sub),
                **{p: score(sub, mode, [ps[i] for i in idx])["speedup"]
                   for p, ps in picks.items()}},
            "selector_picks": [picks["selector"][i] for i in idx],
            "oracle_picks": [picks["oracle"][i] for i in idx]}
    sel, orc = speedup["selector"], speedup["oracle"]
    return {"overall": {"speedup": speedup}, "fixed": fixed, "best_fixed": best_fixed,
            "families": by_family, "share_of_oracle": sel / orc,
            # The stricter reading: the share of the oracle's gain over none that it realized.
            "share_of_oracle_gain": (sel - 1) / (orc - 1) if orc > 1 else 1.0,
            "vs_best_fixed": sel / fixed[best_fixed],
            "accuracy": overall["selector"]["accuracy"],
            "rule_accuracy": overall["rule"]["accuracy"]}


def online(rows: list[dict[str, Any]], methods: list[str], settings: TrainingSettings,
           seed: int, plot_path: Path | None) -> dict[str, Any]:
    """The selector from an empty history over a replayed stream at batch 1."""
    rng = random.Random(seed)
    stream = [r for _ in range(ONLINE_PASSES) for r in rng.sample(rows, len(rows))]
    sel = MethodSelector(None, explore_rate=0.05, seed=seed)
    cands = [Candidate(m) for m in methods]
    seen: list[PerfRecord] = []
    regret, none_regret, cum, cum_none = 0.0, 0.0, [], []
    fixed = max(methods, key=lambda m: score(rows, "bs1", [m] * len(rows))["speedup"])
    fixed_regret, cum_fixed = 0.0, []
    oracle_time = 0.0
    for r in stream:
        load = {"default": load_of("bs1")}
        choice = sel.choose(RequestFeatures.from_dict(r["features"]), cands, load=load)
        m = choice.candidate.method
        tps = r["tps"]["bs1"][m]
        sel.observe(choice, tps)
        seen.append(_record(r, "bs1", m, tps))
        best = min(_time(r, "bs1", x) for x in methods)
        oracle_time += best
        regret += _time(r, "bs1", m) - best
        none_regret += _time(r, "bs1", "none") - best
        fixed_regret += _time(r, "bs1", fixed) - best
        cum.append(regret)
        cum_none.append(none_regret)
        cum_fixed.append(fixed_regret)
        if len(seen) % RETRAIN_EVERY == 0:
            with contextlib.suppress(NotEnoughHistory):
                sel.set_model(train(seen, settings, min_records=RETRAIN_EVERY))
    last = len(rows)
    tail_regret = (cum[-1] - cum[-last - 1]) if len(cum) > last else cum[-1]
    out = {"requests": len(stream), "explored": sel.stats.explored,
           "regret_s": regret, "none_regret_s": none_regret, "best_fixed": fixed,
           "best_fixed_regret_s": fixed_regret,
           "regret_share": regret / oracle_time,
           "last_pass_regret_s": tail_regret, "chosen": dict(sel.stats.chosen)}
    if plot_path is not None:
        out["plot"] = _plot({"selector, from an empty history": cum, "always none": cum_none,
                             f"always {fixed} (best fixed)": cum_fixed}, plot_path)
    return out


def _plot(curves: dict[str, list[float]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (label, values) in enumerate(curves.items()):
        ax.plot(values, label=label, linestyle="-" if i == 0 else "--")
    ax.set_xlabel("request")
    ax.set_ylabel("cumulative regret (decode s)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def selection_ms(rows: list[dict[str, Any]], methods: list[str], tokenizer: Any,
                 settings: TrainingSettings) -> float:
    """p50 of what selection adds to a request on the router: features from the prompt's token
    ids, then the choice (with a trained model). Without a tokenizer the prompts are stand-ins
    of the same lengths."""
    rng = random.Random(1)
    model = train(records(rows, methods), settings, min_records=8)
    sel = MethodSelector(model, explore_rate=0.05)
    cands = [Candidate(m) for m in methods]
    mask = tokenizer_flags(tokenizer) if tokenizer is not None else None
    times = []
    for _ in range(5):
        for r in rows:
            ids = r.get("ids") or [rng.randrange(40_000) for _ in range(r["prompt_tokens"])]
            t0 = time.perf_counter()
            f = request_features(ids, r["max_tokens"], 0.0, 1.0, mask)
            sel.choose(f, cands, load={"default": NO_LOAD})
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
