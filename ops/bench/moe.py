"""`baton bench moe`: MoE expert offload against the all-resident model, in the same run.

The model is the default one split into 16 experts, top-4, by `baton moefy` (made once into the
cache; with `--pregate`, its pre-gated variant, where one router decides every layer), unless
another is given.

For each budget (a fraction of all experts resident) and each policy, a fresh engine serves the
same requests greedily, alone (batch 1) and eight at once (batch 8); the all-resident engine
serves them first and last, and each offloaded figure is a ratio to the mean of the two. With the
disk tier the expert files are dropped from the page cache before every timed phase, so misses
read the disk (a cold start), not a copy left in memory by the phase before.

Decode speed is tokens after the first over the seconds after each request's first token, so
prompt length does not weigh on it. Every run is greedy with `ignore_eos`: each engine produces
the same number of tokens, and offload must give the resident model's tokens (checked).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from baton.actors.engine import Engine
from baton.actors.expert_loads import ExpertCacheStats
from baton.actors.expert_store import DiskStore
from baton.actors.model_source import DEFAULT_MODEL, cache_root
from baton.actors.pregate import CONFIG_KEY as PREGATE_KEY
from baton.engine_config import MOE_POLICIES
from baton.errors import ConfigError, EngineError
from baton.ops.bench.machine import OtherCPUBusy, machine_info, warn_if_busy
from baton.ops.bench.spec import WorkItem, load_workload
from baton.ops.expert_traces import train_experts
from baton.ops.moefy import MoefyOptions
from baton.ops.moefy_run import run_moefy
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

BUDGETS = (0.125, 0.25, 0.5)
BATCHES = (1, 8)
HEADLINE_BUDGET = 0.25
BASELINE_POLICIES = ("lru", "lfu")  # the non-predictive ones: "best vs LRU" compares the others
IDLE_WAIT_S = 30.0
MOEFIED_DEFAULT = "moefied-default-e16k4"
PREDICTOR_TOKENS = 4096  # routing recorded to train the `learned` policy's predictor
GROUPING_BATCH = 4  # the token-grouping experiment's batch size, and its rounds
GROUPING_ROUNDS = 2
GROUPING_RATIOS = ("grouped_vs_shuffled_tok_s", "grouped_vs_shuffled_bytes")


@dataclass(slots=True)
class Phase:
    """One timed run: decode tokens and seconds, the tokens each request produced, and the
    expert cache's counters over it (None for the resident engine)."""

    tokens: int
    seconds: float
    outputs: list[list[int]]
    cache: dict[str, float] | None
    other_cpu: float | None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def run_batch(engine: Engine, prompts: list[str], max_tokens: int) -> tuple[int, float,
                                                                              list[list[int]]]:
    """Serve `prompts` at once: decode tokens (after each one's first), the decode seconds (from
    the first request's first token to the last finish: the batch decodes together), and every
    request's tokens in order."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = list(out.token_ids)
                if out.finish_reason == "error":
                    raise EngineError(f"request failed in the benchmark: {out.error}")
    end = time.perf_counter()
    tokens = sum(len(t) - 1 for t in done.values())
    return tokens, end - min(first.values()), [done[i] for i in ids]


def measure(engine: Engine, items: list[WorkItem], batch: int, max_tokens: int) -> Phase:
    """Batch 1: each request alone, in turn. Batch `batch`: the first `batch` requests (the
    workload cycled) at once. Counters are the cache's deltas over the phase."""
    cold_start(engine)
    before = engine.moe.cache.snapshot() if engine.moe is not None else None
    busy = OtherCPUBusy()
    if batch == 1:
        tokens, seconds, outputs = 0, 0.0, []
        for item in items:
            n, s, out = run_batch(engine, [item.prompt], max_tokens)
            tokens, seconds = tokens + n, seconds + s
            outputs += out
    else:
        prompts = [items[i % len(items)].prompt for i in range(batch)]
        tokens, seconds, outputs = run_batch(engine, prompts, max_tokens)
    cache = None
    if engine.moe is not None and before is not None:
        cache = _delta(before, engine.moe.cache.snapshot())
    return Phase(tokens, seconds, outputs, cache, busy.share())


def cold_start(engine: Engine) -> None:
    """Disk tier: wait for the prefetcher to go quiet, then drop the expert files from the page
    cache."""
    if engine.moe is None or not isinstance(engine.moe.store, DiskStore):
        return
    deadline = time.monotonic() + IDLE_WAIT_S
    while not engine.moe.cache.idle():
        if time.monotonic() > deadline:
            raise EngineError(f"the expert prefetcher did not go idle in {IDLE_WAIT_S:.0f}s")
        time.sleep(0.01)
    engine.moe.store.drop_page_cache()


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The cache's counters over a phase, with the rates the cache itself derives from them."""
    counters = {f.name: after[f.name] - before[f.name] for f in fields(ExpertCacheStats)}
    return ExpertCacheStats(**counters).as_dict()


def run_engine(engine: Engine, items: list[WorkItem], max_tokens: int,
               warmup: str) -> dict[int, Phase]:
    """Warm `engine` on one short request, time both batch sizes, release its expert cache."""
    try:
        engine.generate([warmup], SamplingParams(max_tokens=4))
        return {b: measure(engine, items, b, max_tokens) for b in BATCHES}
    finally:
        if engine.moe is not None:
            engine.moe.close()


def moefied_default(console: Console, pregate: bool = False) -> str:
    """The default model split into 16 experts, top-4 (`baton moefy`, with `--pregate` if asked),
    made once in the cache."""
    path = cache_root() / "models" / (MOEFIED_DEFAULT + ("-pregate" if pregate else ""))
    if not (path / "config.json").is_file():
        console.log(f"moefying the default model into {path} (once)")
        with tempfile.TemporaryDirectory(prefix=".moefy-", dir=path.parent) as tmp:
            run_moefy(DEFAULT_MODEL, Path(tmp) / "out",
                      MoefyOptions(experts=16, top_k=4, pregate=pregate))
            (Path(tmp) / "out").rename(path)
    return str(path)


def predictor_for(model: str, predictor: str | None, scratch: Path, dtype: str, device: str,
                  threads: int, console: Console) -> tuple[str, dict[str, Any] | None]:
    """The routing-path predictor the `learned` policy runs with: `predictor` if given, else one
    trained now on `baton train-experts`' prompts (not the benchmark's workload); and the
    training report (None when given)."""
    if predictor is not None:
        return predictor, None
    path = scratch / "routing-predictor.safetensors"
    console.log(f"training a routing predictor for {model} ({PREDICTOR_TOKENS} tokens)")
    report = train_experts(model, path, tokens=PREDICTOR_TOKENS, dtype=dtype, device=device,
                           threads=threads)
    return str(path), report.as_dict()


def policies_for(model: str, policies: list[str] | None) -> list[str]:
    """`policies`, or every policy `model` can run (`pregate` needs a pre-gated checkpoint);
    `ConfigError` for a name no policy has."""
    if policies is None:
        return [p for p in MOE_POLICIES if p != "pregate" or has_pregate(model)]
    unknown = [p for p in policies if p not in MOE_POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {unknown}; choose among {list(MOE_POLICIES)}")
    return policies


def has_pregate(model: str) -> bool:
    """Whether the checkpoint directory `model` is routed by a pre-gate (`baton moefy
    --pregate`)."""
    config = Path(model) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get(PREGATE_KEY))


def run_moe_bench(model: str | None, policies: list[str] | None, budgets: list[float],
                  tier: str, num_requests: int, max_tokens: int, threads: int, dtype: str,
                  device: str, workload: str | None, predictor: str | None,
                  console: Console, pregate: bool = False,
                  grouping: bool = False) -> dict[str, Any]:
    """Every (budget, policy) against the resident engine; see the module docstring.
    `policies` None: every one the model can run. `grouping`: also the token-grouping
    experiment (`moe_grouping`) with the pre-gate's policy (else `lookahead`) at the headline
    budget, over the whole workload."""
    model = model or moefied_default(console, pregate)
    policies = policies_for(model, policies)
    with tempfile.TemporaryDirectory(prefix="baton-bench-moe-") as scratch:
        trained = None
        options: dict[str, dict[str, Any]] = {}
        if "learned" in policies:
            path, trained = predictor_for(model, predictor, Path(scratch), dtype, device, threads,
                                          console)
            options["learned"] = {"predictor": path}
        # First: a workload too small for it fails before the long part.
        grouped = _grouping(model, tier, max_tokens, threads, dtype, device, workload,
                            console) if grouping else None
        report = _run(model, policies, budgets, tier, num_requests, max_tokens, threads, dtype,
                      device, workload, options, console)
    report["predictor_training"] = trained
    if grouped is not None:
        report["grouping"] = grouped
        report["ratios"].update({k: grouped[k] for k in GROUPING_RATIOS})
    return report


def _grouping(model: str, tier: str, max_tokens: int, threads: int, dtype: str, device: str,
              workload: str | None, console: Console) -> dict[str, Any]:
    from baton.ops.bench.moe_grouping import run_grouping  # it builds on this module

    policy = "pregate" if has_pregate(model) else "lookahead"
    offload = {"budget": HEADLINE_BUDGET, "policy": policy, "tier": tier}
    return run_grouping(model, offload, workload, GROUPING_BATCH, max_tokens, GROUPING_ROUNDS,
                        _engine_options(threads, dtype, device), console)


def _engine_options(threads: int, dtype: str, device: str) -> dict[str, Any]:
    """What every engine of the benchmark shares."""
    return dict(dtype=dtype, num_threads=threads, device=device, methods=["none"])


def _run(model: str, policies: list[str], budgets: list[float], tier: str, num_requests: int,
         max_tokens: int, threads: int, dtype: str, device: str, workload: str | None,
         policy_options: dict[str, dict[str, Any]], console: Console) -> dict[str, Any]:
    common = _engine_options(threads, dtype, device)

    def resident() -> Engine:
        return Engine(model, **common)

    engine = resident()  # reads the workload (chat prompts need its template), then runs first
    items = load_workload(workload, engine)[:num_requests]
    warmup = items[0].prompt[:200]
    runs: dict[str, Any] = {}
    console.log("all-resident engine (first run)")
    first = run_engine(engine, items, max_tokens, warmup)
    del engine
    for budget in budgets:
        for policy in policies:
            offload = {"budget": budget, "policy": policy, "tier": tier,
                       **policy_options.get(policy, {})}
            console.log(f"budget {budget:.1%}, policy {policy}")
            phases = run_engine(Engine(model, moe_offload=offload, **common),
                                items, max_tokens, warmup)
            runs[f"{budget}/{policy}"] = {"budget": budget, "policy": policy, "phases": phases}
    console.log("all-resident engine (last run)")
    last = run_engine(resident(), items, max_tokens, warmup)
    return summarize(first, last, runs, model=model, tier=tier, dtype=dtype, device=device,
                     threads=threads, num_requests=len(items), max_tokens=max_tokens,
                     workload=workload or "built-in", policies=policies, budgets=budgets)


def summarize(first: dict[int, Phase], last: dict[int, Phase], runs: dict[str, Any],
              **meta: Any) -> dict[str, Any]:
    """Per (budget, policy, batch): tok/s, its ratio to the resident mean, the cache figures;
    the headline ratios at `HEADLINE_BUDGET`."""
    resident = {b: (first[b].tok_s + last[b].tok_s) / 2 for b in BATCHES}
    rows = []
    for run in runs.values():
        for b, phase in run["phases"].items():
            if phase.outputs != first[b].outputs:
                raise EngineError(
                    f"policy {run['policy']} at budget {run['budget']} changed the greedy tokens "
                    f"at batch {b}: offload must give the resident model's output")
            rows.append({"budget": run["budget"], "policy": run["policy"], "batch": b,
                         "tok_s": phase.tok_s, "vs_resident": phase.tok_s / resident[b],
                         "other_cpu": phase.other_cpu, **(phase.cache or {})})
    return {"bench": "moe", **meta, "machine": machine_info(meta["threads"]),
            "resident_tok_s": {str(b): resident[b] for b in BATCHES},
            "resident_runs_tok_s": {str(b): [first[b].tok_s, last[b].tok_s] for b in BATCHES},
            "rows": rows, "ratios": headline(rows)}


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """At `HEADLINE_BUDGET`, batch 1: the best policy's speed against resident and its hit rate,
    and the best predictive policy against LRU (None where the policies needed were not run)."""
    at = [r for r in rows if r["budget"] == HEADLINE_BUDGET and r["batch"] == 1]
    if not at:
        return {}
    best = max(at, key=lambda r: r["tok_s"])
    lru = next((r for r in at if r["policy"] == "lru"), None)
    predictive = [r for r in at if r["policy"] not in BASELINE_POLICIES]
    best_pred = max(predictive, key=lambda r: r["tok_s"]) if predictive else None
    batch8 = {r["policy"]: r["vs_resident"] for r in rows
              if r["budget"] == HEADLINE_BUDGET and r["batch"] == max(BATCHES)}
    return {
        "best_policy_at_25pct": best["policy"],
        "tps_vs_resident_at_25pct": best["vs_resident"],
        "hit_rate_at_25pct": best["hit_rate"],
        "best_predictive_policy_at_25pct": best_pred["policy"] if best_pred else None,
        "best_vs_lru_at_25pct": (best_pred["tok_s"] / lru["tok_s"]
                                 if best_pred and lru and lru["tok_s"] else None),
        "tps_vs_resident_at_25pct_batch8": batch8,
    }


def show(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"bench moe: {report['model']} ({report['tier']} tier, {report['dtype']}"
                        f", {report['device']}), decode tok/s against all-resident")
    for col in ("budget", "policy", "batch", "tok/s", "vs resident", "hit rate", "precision",
                "recall", "MB loaded", "stall s"):
        table.add_column(col, justify="right" if col not in ("policy",) else "left")
    for b in BATCHES:
        table.add_row("100%", "resident", str(b), f"{report['resident_tok_s'][str(b)]:.1f}",
                      "1.00x", "", "", "", "", "")
    for r in report["rows"]:
        table.add_row(f"{r['budget']:.1%}", r["policy"], str(r["batch"]), f"{r['tok_s']:.1f}",
                      f"{r['vs_resident']:.2f}x", f"{r['hit_rate']:.2f}",
                      f"{r['prefetch_precision']:.2f}", f"{r['prefetch_recall']:.2f}",
                      f"{r['bytes_loaded'] / 2**20:.1f}", f"{r['stall_seconds']:.2f}")
    console.print(table)
    grouping = report.get("grouping")
    if grouping:
        console.print(f"grouping ({grouping['policy']}, {grouping['budget']:.0%} resident, "
                      f"batches of {grouping['batch']}, {grouping['requests']} requests):")
        for name, arr in grouping["arrangements"].items():
            console.print(f"  {name}: within-batch cosine {arr['mean_cosine']:.2f}, "
                          f"{arr['mib_per_token']:.2f} MiB read a token, {arr['tok_s']:.1f} tok/s")
        console.print(f"  grouped against shuffled: {grouping['grouped_vs_shuffled_tok_s']:.2f}x "
                      f"tok/s, {grouping['grouped_vs_shuffled_bytes']:.2f}x bytes")
    ratios = report["ratios"]
    if ratios:
        lru = ratios["best_vs_lru_at_25pct"]
        console.print(
            f"at 25% resident, batch 1: best policy {ratios['best_policy_at_25pct']} "
            f"{ratios['tps_vs_resident_at_25pct']:.2f}x resident, hit rate "
            f"{ratios['hit_rate_at_25pct']:.2f}; best predictive "
            f"{ratios['best_predictive_policy_at_25pct']} vs LRU: "
            + (f"{lru:.2f}x" if lru is not None else "n/a"))
    warn_if_busy(console, {f"{r['budget']}/{r['policy']}/b{r['batch']}": r["other_cpu"]
                           for r in report["rows"]}, "rerun on a quiet machine")
