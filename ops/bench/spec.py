"""`baton bench spec`: every acceleration method against `none` on one engine, per task family, at
batch 1 and at 16 concurrent requests, with the per-request oracle.

A workload is JSONL, one request a line: `{"task": ..., "prompt": ... | "messages": [...],
"max_tokens": N}` (`task` only groups the report). Decode speed is tokens after the first over
the seconds after the first token, so prompt length does not weigh on it. Greedy decoding; every
method runs the same requests on the same engine in the same run, interleaved per request so that
load from other processes falls on all of them alike.

Each prompt is prefilled once before its methods run, so every method, `none` included, finds it
in the prefix cache. In bf16 a cache hit recomputes the prompt's last tokens on another path than
a whole prefill, which can change a greedy answer; without the priming `none` alone would answer
from a miss and the other methods from hits, and they would be timed on different text. Each
method's report says on how many requests its tokens were `none`'s (`identical_to_none`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from baton.actors.engine import Engine
from baton.errors import ConfigError
from baton.ops.bench.machine import machine_info
from baton.ops.bench.spec_ceiling import lookup_oracle_passes
from baton.outputs import RequestOutput
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

BUILTIN_WORKLOAD = "spec_workload.jsonl"
CONCURRENCY = 16


@dataclass(slots=True)
class WorkItem:
    task: str
    prompt: str
    max_tokens: int


def load_workload(path: str | None, engine: Engine,
                  builtin: str = BUILTIN_WORKLOAD) -> list[WorkItem]:
    """Requests of a workload file (the built-in one, `builtin`, when `path` is None)."""
    if path is None:
        text = resources.files("baton.ops.bench").joinpath(builtin).read_text()
    else:
        text = Path(path).read_text()
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row.get("prompt")
            if prompt is None:
                prompt = engine.apply_chat_template(row["messages"])
            items.append(WorkItem(str(row.get("task", "default")), prompt,
                                  int(row.get("max_tokens", 128))))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"workload line {n}: {exc}; each line needs 'prompt' or "
                              "'messages' and may have 'task' and 'max_tokens'") from exc
    if not items:
        raise ConfigError("the workload has no requests")
    return items


def _decode_stats(out: RequestOutput) -> dict[str, Any]:
    m = out.metrics
    n = len(out.token_ids)
    seconds = (m.finished or 0.0) - (m.first_token or 0.0)
    return {"tokens": n - 1, "seconds": seconds, "drafted": m.spec_draft_tokens,
            "accepted": m.spec_accepted_tokens, "drafts": m.spec_num_drafts,
            "passes": m.num_forward_passes}


def run_batch1(engine: Engine, items: list[WorkItem], methods: list[str],
               console: Console) -> list[dict[str, dict[str, Any]]]:
    """Each request alone, every method in turn, after one priming prefill of its prompt (see
    the module doc): per request, stats by method."""
    results = []
    for i, item in enumerate(items):
        engine.generate([item.prompt], SamplingParams(max_tokens=1))
        outs = {m: engine.generate([item.prompt], SamplingParams(max_tokens=item.max_tokens,
                                                                  method=m))[0]
                for m in methods}
        results.append({m: {**_decode_stats(out),
                            "identical_to_none": out.token_ids == outs["none"].token_ids}
                        for m, out in outs.items()})
        settings = engine.speculator.settings
        results[-1]["none"]["lookup_oracle_passes"] = lookup_oracle_passes(
            engine.encode(item.prompt), outs["none"].token_ids, settings.ngram_max,
            settings.max_speculative_tokens)
        console.log(f"batch 1: request {i + 1}/{len(items)} ({item.task})")
    return results


def _forget_generated(engine: Engine) -> None:
    """Clear what `lookahead`'s shared trie learnt from earlier runs: the concurrent runs repeat
    the batch-1 prompts, whose greedy outputs it would otherwise draft from memory."""
    if engine.speculator.lookahead is not None:
        engine.speculator.lookahead.forget_shared()


def _concurrent_rate(engine: Engine, batch: list[WorkItem], method: str,
                     max_tokens: int | None = None) -> float:
    """Output tokens per second of `batch` run together with `method`."""
    _forget_generated(engine)
    ids = [engine.add_request(it.prompt, SamplingParams(
        max_tokens=max_tokens or it.max_tokens, method=method)) for it in batch]
    t0 = time.perf_counter()
    tokens = 0
    left = set(ids)
    while left:
        for o in engine.step():
            if o.finished and o.request_id in left:
                left.discard(o.request_id)
                tokens += len(o.token_ids)
    return tokens / (time.perf_counter() - t0)


def run_concurrent(engine: Engine, items: list[WorkItem], methods: list[str],
                   console: Console, rounds: int = 2) -> dict[str, float]:
    """Tokens per second of `CONCURRENCY` requests at once (the workload cycled), per method:
    the mean of `rounds` runs, every other round in reverse order, after a short warm-up of
    every method at that width (so the first method measured pays for no first-time setup)."""
    batch = [items[i % len(items)] for i in range(CONCURRENCY)]
    for method in methods:
        _concurrent_rate(engine, batch, method, max_tokens=4)
    rates: dict[str, list[float]] = defaultdict(list)
    for r in range(rounds):
        for method in methods if r % 2 == 0 else methods[::-1]:
            rates[method].append(_concurrent_rate(engine, batch, method))
            console.log(f"{CONCURRENCY} concurrent, round {r + 1}: {method} "
                        f"{rates[method][-1]:.1f} tok/s")
    return {m: sum(v) / len(v) for m, v in rates.items()}


def summarize(items: list[WorkItem], bs1: list[dict[str, dict[str, Any]]],
              c16: dict[str, float], methods: list[str]) -> dict[str, Any]:
    """Per family and method: tok/s, acceptance, mean accepted length, output tokens per decode
    pass, speedup over none; per family the prompt-lookup oracle's tokens per decode pass."""
    families: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_family[item.task].append(i)
    ratios: dict[str, Any] = {"best_speedup_bs1": {}, "lookup_oracle_tokens_per_pass": {}}
    for family, idx in by_family.items():
        tok = sum(bs1[i]["none"]["tokens"] for i in idx)
        oracle = sum(bs1[i]["none"].get("lookup_oracle_passes", 0) for i in idx)
        ratios["lookup_oracle_tokens_per_pass"][family] = tok / oracle if oracle else None
        for method in methods:
            rows = [bs1[i][method] for i in idx]
            tok = sum(r["tokens"] for r in rows)
            sec = sum(r["seconds"] for r in rows)
            passes = sum(r["passes"] - 1 for r in rows)  # the first makes the first token
            drafted = sum(r["drafted"] for r in rows)
            drafts = sum(r["drafts"] for r in rows)
            families[family][method] = {
                "tok_s": tok / sec if sec else 0.0,
                "identical_to_none": sum(r["identical_to_none"] for r in rows) / len(rows),
                "acceptance_rate": sum(r["accepted"] for r in rows) / drafted if drafted else None,
                "mean_accepted_length": (1 + sum(r["accepted"] for r in rows) / drafts
                                         if drafts else None),
                "tokens_per_pass": tok / passes if passes > 0 else None,
            }
        base = families[family]["none"]["tok_s"]
        for method in methods:
            families[family][method]["speedup"] = (families[family][method]["tok_s"] / base
                                                   if base else None)
        best = max((m for m in methods if m != "none"),
                   key=lambda m: families[family][m]["speedup"] or 0.0, default="none")
        ratios["best_speedup_bs1"][family] = {"method": best,
                                              "speedup": families[family][best]["speedup"]}
    none_s = sum(r["none"]["seconds"] / max(r["none"]["tokens"], 1) for r in bs1)
    oracle_s = sum(min(r[m]["seconds"] / max(r[m]["tokens"], 1) for m in methods) for r in bs1)
    ratios["oracle_speedup_bs1"] = none_s / oracle_s if oracle_s else None
    if c16:
        ratios["speedup_c16"] = {m: c16[m] / c16["none"] for m in methods}
        ratios["worst_speedup_c16"] = min(v for m, v in ratios["speedup_c16"].items()
                                          if m != "none")
    return {"families": dict(families), "tok_s_c16": c16, "ratios": ratios}


def bench_methods(methods: list[str], draft_model: str | None,
                  medusa_heads: str | None) -> list[str]:
    """The methods to time: `none` first, then `methods`, then `draft` and `medusa` where their
    model or heads are given and the list leaves them out (passing heads means comparing them)."""
    names = ["none", *(m for m in methods if m != "none")]
    for method, given in (("draft", draft_model), ("medusa", medusa_heads)):
        if given and method not in names:
            names.append(method)
    return names


def run_spec_bench(workload: str | None, methods: list[str], draft_model: str | None,
                   threads: int, dtype: str, console: Console,
                   medusa_heads: str | None = None, model: str = "default",
                   device: str = "cpu", concurrent: bool = True) -> dict[str, Any]:
    """The benchmark; `concurrent` False leaves out the 16-concurrent part (a GPU's batch-1
    run)."""
    methods = bench_methods(methods, draft_model, medusa_heads)
    engine = Engine(model=model, dtype=dtype, num_threads=threads, methods=methods,
                    draft_model=draft_model, medusa_heads=medusa_heads, device=device)
    items = load_workload(workload, engine)
    # Warm-up, every method: on a GPU a method's first verify pass compiles its kernels (0.3 s
    # on an H200), which would land in the first request's time.
    for method in methods:
        engine.generate([items[0].prompt], SamplingParams(max_tokens=8, method=method))
    _forget_generated(engine)
    bs1 = run_batch1(engine, items, methods, console)
    c16 = run_concurrent(engine, items, methods, console) if concurrent else {}
    report = summarize(items, bs1, c16, methods)
    report.update(bench="spec", model=engine.source.name, dtype=dtype, methods=methods,
                  device=str(engine.device), workload=workload or "built-in",
                  num_requests=len(items), machine=machine_info(threads), per_request_bs1=bs1)
    return report


def show(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"bench spec: {report['model']} {report['dtype']}, decode tok/s "
                        "(speedup over none; acceptance)")
    methods = report["methods"]
    table.add_column("family")
    for m in methods:
        table.add_column(m, justify="right")
    for family, by_method in report["families"].items():
        cells = []
        for m in methods:
            r = by_method[m]
            acc = f"; {r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else ""
            cells.append(f"{r['tok_s']:.1f} ({r['speedup']:.2f}x{acc})")
        table.add_row(family, *cells)
    ratios = report["ratios"]
    if report["tok_s_c16"]:
        table.add_row(f"{CONCURRENCY} concurrent", *(
            f"{report['tok_s_c16'][m]:.1f} ({ratios['speedup_c16'][m]:.2f}x)" for m in methods))
    console.print(table)
    console.print(f"oracle speedup at batch 1: {ratios['oracle_speedup_bs1']:.2f}x")
    lookup = [m for m in ("ngram", "lookahead") if m in methods]
    if lookup:
        console.print("output tokens per decode pass, prompt lookup's oracle (best continuation "
                      f"in the text) against {' and '.join(lookup)}:")
        for family, oracle in ratios.get("lookup_oracle_tokens_per_pass", {}).items():
            if oracle is None:
                continue
            got = ", ".join(f"{m} {report['families'][family][m]['tokens_per_pass'] or 0:.2f}"
                            for m in lookup)
            console.print(f"  {family}: oracle {oracle:.2f}; {got}")
    if report["tok_s_c16"]:
        console.print(f"worst method at {CONCURRENCY} concurrent: "
                      f"{ratios['worst_speedup_c16']:.2f}x")
