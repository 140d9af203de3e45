"""`baton bench moe --grouping`: does batching requests whose experts overlap read less from the
expert store? (ExpertFlow's token scheduling, measured with an oracle.)

One offloaded engine serves every request of the workload alone first, and the expert cache
counts which experts each one used (`ExpertCache.uses`): its expert-use vector over (layer,
expert). Then the same requests are served in batches of `batch`, arranged two ways, alternated
over `rounds`, the expert files dropped from the page cache before each:

- `shuffled`: the workload in an order shuffled with a fixed seed (what arrival order gives a
  scheduler), cut into batches;
- `grouped`: greedily by the cosine of the requests' vectors (a batch is the first request left
  and the `batch - 1` closest to it).

The grouping uses the requests' own measured routing, which no scheduler has before it runs
them, so it bounds what any predictor of a request's experts could gain by grouping. Reported
per arrangement: its batches, the mean within-batch cosine, bytes read per decoded token and
decode tok/s (means over rounds), and the ratios of grouped to shuffled.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from typing import Any

import torch
from rich.console import Console

from baton.actors.engine import Engine
from baton.actors.expert_policies import ExpertKey
from baton.errors import ConfigError
from baton.ops.bench.moe import cold_start, run_batch
from baton.ops.bench.spec import WorkItem, load_workload
from baton.sampling import SamplingParams

SEED = 0


def group_by_experts(vectors: list[Counter[ExpertKey]], batch: int) -> list[list[int]]:
    """Indices of `vectors` in batches of `batch` (the last may be shorter): each batch is the
    first index left and the `batch - 1` left whose vectors are closest to it (cosine)."""
    sim = _cosines(vectors)
    left = list(range(len(vectors)))
    groups = []
    while left:
        seed, rest = left[0], left[1:]
        rest.sort(key=lambda i: -float(sim[seed, i]))
        group = sorted([seed, *rest[: batch - 1]])
        groups.append(group)
        left = [i for i in left if i not in group]
    return groups


def mean_cosine(vectors: list[Counter[ExpertKey]], groups: list[list[int]]) -> float:
    """The mean cosine over pairs of requests that share a batch."""
    sim = _cosines(vectors)
    pairs = [float(sim[a, b]) for g in groups for i, a in enumerate(g) for b in g[i + 1:]]
    return statistics.mean(pairs) if pairs else 0.0


def _cosines(vectors: list[Counter[ExpertKey]]) -> torch.Tensor:
    keys = sorted(set().union(*vectors))
    column = {key: i for i, key in enumerate(keys)}
    m = torch.zeros(len(vectors), max(len(keys), 1), dtype=torch.float64)
    for row, vector in enumerate(vectors):
        for key, count in vector.items():
            m[row, column[key]] = count
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return m @ m.T


def run_grouping(model: str, offload: dict[str, Any], workload: str | None, batch: int,
                 max_tokens: int, rounds: int, common: dict[str, Any],
                 console: Console) -> dict[str, Any]:
    """The experiment of the module docstring over every request of `workload` (None: the
    built-in one), on a fresh engine offloading as `offload` says; `ConfigError` when the
    workload has fewer than two batches of requests."""
    engine = Engine(model, moe_offload=offload, **common)
    assert engine.moe is not None
    try:
        items = load_workload(workload, engine)
        if len(items) < 2 * batch:
            raise ConfigError(f"--grouping needs at least {2 * batch} requests in the workload "
                              f"(batches of {batch}); it has {len(items)}")
        engine.generate([items[0].prompt[:200]], SamplingParams(max_tokens=4))
        console.log(f"grouping: each of {len(items)} requests alone, counting its experts")
        vectors = []
        for item in items:
            before = Counter(engine.moe.cache.uses)
            run_batch(engine, [item.prompt], max_tokens)
            vectors.append(engine.moe.cache.uses - before)
        order = random.Random(SEED).sample(range(len(items)), len(items))
        arrangements = {
            "shuffled": [sorted(order[i : i + batch]) for i in range(0, len(order), batch)],
            "grouped": group_by_experts(vectors, batch),
        }
        measured: dict[str, list[tuple[float, float]]] = {name: [] for name in arrangements}
        for r in range(rounds):
            for name, groups in arrangements.items():
                console.log(f"grouping: round {r + 1} of {rounds}, {name} batches of {batch}")
                measured[name].append(_serve(engine, items, groups, max_tokens))
    finally:
        engine.moe.close()
    report: dict[str, Any] = {"policy": offload["policy"], "budget": offload["budget"],
                              "batch": batch, "rounds": rounds, "requests": len(items),
                              "arrangements": {}}
    for name, groups in arrangements.items():
        report["arrangements"][name] = {
            "batches": groups,
            "mean_cosine": mean_cosine(vectors, groups),
            "mib_per_token": statistics.mean(m[0] for m in measured[name]),
            "tok_s": statistics.mean(m[1] for m in measured[name]),
        }
    grouped, shuffled = report["arrangements"]["grouped"], report["arrangements"]["shuffled"]
    report["grouped_vs_shuffled_tok_s"] = grouped["tok_s"] / shuffled["tok_s"]
    report["grouped_vs_shuffled_bytes"] = grouped["mib_per_token"] / shuffled["mib_per_token"]
    return report


def _serve(engine: Engine, items: list[WorkItem], groups: list[list[int]],
           max_tokens: int) -> tuple[float, float]:
    """Serve `groups` one batch after another from cold files: MiB read per decoded token, and
    decoded tokens per second."""
    assert engine.moe is not None
    cold_start(engine)
    before = engine.moe.cache.snapshot()["bytes_loaded"]
    tokens, seconds = 0, 0.0
    for group in groups:
        n, s, _ = run_batch(engine, [items[i].prompt for i in group], max_tokens)
        tokens, seconds = tokens + n, seconds + s
    read = engine.moe.cache.snapshot()["bytes_loaded"] - before
    return read / 2**20 / max(tokens, 1), tokens / seconds if seconds else 0.0
