"""`baton bench select`: the method selector against every fixed method and the per-request oracle.

First every candidate method serves every request of the workload, at batch 1 and with 16 requests
in flight (the candidate matrix: each request's decode tokens/s under each method, measured on one
engine in one run). Then the policies are scored on that matrix (`select_eval.py`): random choice,
the best single fixed method, a hand-written rule, the learned selector (trained without the family
it is scored on: leave-one-family-out; or on `--train`'s workload), the selector learning online
from an empty history, and the oracle. The workload's `task` only groups the report: the selector
sees the features the router computes, never the label.

`--matrix FILE` scores a matrix measured before (the JSONL this bench writes next to its JSON)
without measuring again, with the features recomputed from its prompts' token ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from baton.actors.engine import Engine
from baton.actors.model_source import load_tokenizer, resolve
from baton.errors import ConfigError
from baton.ops.bench.machine import machine_info
from baton.ops.bench.select_eval import MODES, evaluate
from baton.ops.bench.spec import WorkItem, _decode_stats, load_workload
from baton.router.features import request_features, tokenizer_flags
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

BUILTIN_WORKLOAD = "select_workload.jsonl"
CONCURRENCY = MODES["c16"]


def _tps(stats: dict[str, Any]) -> float:
    return stats["tokens"] / stats["seconds"] if stats["seconds"] > 0 else 0.0


def measure_bs1(engine: Engine, items: list[WorkItem], methods: list[str],
                console: Console) -> list[dict[str, float]]:
    """Each request alone under every method, interleaved so noise falls on all alike."""
    out = []
    for i, item in enumerate(items):
        row = {}
        for m in methods:
            res = engine.generate([item.prompt], SamplingParams(max_tokens=item.max_tokens,
                                                                method=m))[0]
            row[m] = _tps(_decode_stats(res))
        out.append(row)
        console.log(f"batch 1: {i + 1}/{len(items)} ({item.task}) " +
                    " ".join(f"{m} {v:.1f}" for m, v in row.items()))
    return out


def measure_concurrent(engine: Engine, items: list[WorkItem], methods: list[str],
                       console: Console, concurrency: int = CONCURRENCY) -> list[dict[str, float]]:
    """Per method, the whole workload with `concurrency` requests in flight: each request's
    decode tokens/s under that load."""
    out: list[dict[str, float]] = [{} for _ in items]
    for m in methods:
        pending = list(range(len(items)))
        running: dict[str, int] = {}
        while pending or running:
            while pending and len(running) < concurrency:
                i = pending.pop(0)
                it = items[i]
                rid = engine.add_request(it.prompt, SamplingParams(max_tokens=it.max_tokens,
                                                                   method=m))
                running[rid] = i
            for o in engine.step():
                if o.finished and o.request_id in running:
                    out[running.pop(o.request_id)][m] = _tps(_decode_stats(o))
        mean = sum(r[m] for r in out) / len(out)
        console.log(f"{concurrency} in flight: {m} mean {mean:.1f} tok/s per request")
    return out


def measure(workload: str | None, methods: list[str], engine: Engine,
            console: Console) -> list[dict[str, Any]]:
    """The candidate matrix of a workload: one row per request."""
    items = load_workload(workload, engine, builtin=BUILTIN_WORKLOAD)
    mask = tokenizer_flags(engine.tokenizer, engine.vocab_size)
    engine.generate([items[0].prompt], SamplingParams(max_tokens=8))  # warm-up
    bs1 = measure_bs1(engine, items, methods, console)
    c16 = measure_concurrent(engine, items, methods, console)
    rows = []
    for item, a, b in zip(items, bs1, c16, strict=True):
        ids = engine.encode(item.prompt)
        feats = request_features(ids, item.max_tokens, 0.0, 1.0, mask)
        rows.append({"task": item.task, "prompt_tokens": len(ids), "max_tokens": item.max_tokens,
                     "features": feats.as_dict(), "tps": {"bs1": a, "c16": b}, "ids": ids})
    return rows


def read_matrix(path: str) -> list[dict[str, Any]]:
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the matrix {path}: {exc}") from exc
    if not rows or any("tps" not in r or "features" not in r for r in rows):
        raise ConfigError(f"{path} is not a candidate matrix written by `baton bench select`")
    return rows


def write_matrix(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_select_bench(json_path: str | None, workload: str | None, train: str | None,
                     matrix: str | None, methods: list[str], threads: int, dtype: str,
                     console: Console) -> dict[str, Any]:
    if "none" not in methods:
        methods = ["none", *methods]
    engine = None
    if matrix is not None:
        rows = read_matrix(matrix)
        methods = list(rows[0]["tps"]["bs1"])
        tokenizer = load_tokenizer(resolve("default"))
        flags = tokenizer_flags(tokenizer)
        for row in rows:  # features as this version of the router computes them
            if "ids" in row:
                row["features"] = request_features(row["ids"], row["max_tokens"], 0.0, 1.0,
                                                   flags).as_dict()
    else:
        engine = Engine(dtype=dtype, num_threads=threads, methods=methods)
        rows = measure(workload, methods, engine, console)
    train_rows = None
    if train is not None:
        if engine is None:
            engine = Engine(dtype=dtype, num_threads=threads, methods=methods)
        train_rows = measure(train, methods, engine, console)
    base = Path(json_path) if json_path else None
    if base is not None and matrix is None:
        write_matrix(rows, base.with_suffix(".matrix.jsonl"))
    if engine is not None:
        tokenizer = engine.tokenizer
    report = evaluate(rows, train_rows, methods, console,
                      plot_path=base.with_suffix(".regret.png") if base else None,
                      tokenizer=tokenizer)
    report.update(bench="select", methods=methods, workload=workload or "built-in",
                  train=train, matrix=matrix, num_requests=len(rows),
                  machine=machine_info(threads), dtype=dtype)
    return report


def show(report: dict[str, Any], console: Console) -> None:
    for mode in MODES:
        res = report["modes"][mode]
        table = Table(title=f"bench select, {mode}: speedup over none (decode time), "
                            f"{report['num_requests']} requests")
        table.add_column("family")
        policies = list(res["overall"]["speedup"])
        for p in policies:
            table.add_column(p, justify="right")
        for family, by in res["families"].items():
            table.add_row(family, *(f"{by['speedup'][p]:.2f}x" for p in policies))
        table.add_row("all", *(f"{res['overall']['speedup'][p]:.2f}x" for p in policies))
        console.print(table)
        console.print(f"{mode}: best fixed {res['best_fixed']}; selector share of oracle "
                      f"{res['share_of_oracle']:.2f} (of its gain "
                      f"{res['share_of_oracle_gain']:.2f}), vs best fixed "
                      f"{res['vs_best_fixed']:.2f}x, accuracy {res['accuracy']:.2f}")
    r = report["ratios"]
    console.print(f"selection p50 {report['selection_ms_p50']:.3f} ms; online from empty: "
                  f"regret share {report['online']['regret_share']:.2f}; headline (worse of the "
                  f"two loads): share_of_oracle {r['share_of_oracle']:.2f}, vs_best_fixed "
                  f"{r['vs_best_fixed']:.2f}x, accuracy {r['accuracy']:.2f}")
