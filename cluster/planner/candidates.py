"""The layouts a plan considers: colocated pools per GPU type, prefill/decode pairs of GPU types
(the same or mixed, each at its fewest devices per replica and, for decode, twice that), with
replica ratios and prefill thresholds; or, for a CPU machine, splits of its cores."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from baton.cluster.planner.catalog import Catalog, DeviceSpec
from baton.cluster.planner.cost import MAX_TP, CostModel, Efficiency, min_tp
from baton.cluster.planner.layout import Layout, PoolPlan
from baton.cluster.planner.model import ModelProfile
from baton.errors import ConfigError

COLOCATED_REPLICAS = (1, 2, 4)
DISAGG_RATIOS = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1))
THRESHOLDS = (64, 512)


def engines(device: DeviceSpec, model: ModelProfile, eff: Efficiency | None,
            wider: bool) -> list[CostModel]:
    """Replica shapes of `model` on `device`: the fewest devices, and twice that if `wider`."""
    tp = min_tp(device, model)
    shapes = [tp] + ([2 * tp] if wider and 2 * tp <= MAX_TP else [])
    return [CostModel(device, model, t, eff) for t in shapes]


def gpu_layouts(model: ModelProfile, catalog: Catalog, gpus: Sequence[str],
                decode_gpus: Sequence[str] | None = None,
                thresholds: Sequence[int] = THRESHOLDS, colocated: bool = True,
                disaggregated: bool = True,
                efficiency: dict[str, Efficiency] | None = None) -> Iterator[Layout]:
    """Colocated layouts on each of `gpus`; disaggregated ones with prefill on `gpus` and decode
    on `decode_gpus` (default: `gpus`). GPUs the model fits on none of are skipped; a
    `ConfigError` if it fits none at all."""
    eff = efficiency or {}
    shapes: dict[str, list[CostModel]] = {}
    for name in {*gpus, *(decode_gpus or gpus)}:
        dev = catalog.get(name)
        try:
            shapes[dev.name] = engines(dev, model, eff.get(dev.name), wider=True)
        except ConfigError:
            continue
    if not shapes:
        raise ConfigError(f"{model.name} ({model.weight_bytes / 1e9:.0f} GB of weights) fits "
                          f"none of {', '.join(gpus)} even at {MAX_TP} per replica; allow "
                          "larger GPUs (--gpus H200,H100,...) or a smaller model")
    pre = [catalog.get(g).name for g in gpus if catalog.get(g).name in shapes]
    dec = [catalog.get(g).name for g in (decode_gpus or gpus) if catalog.get(g).name in shapes]
    if colocated:
        for g in pre:
            for cost in shapes[g]:
                for r in COLOCATED_REPLICAS:
                    yield Layout((PoolPlan("both", cost, r),))
    if disaggregated:
        for gp in pre:
            for gd in dec:
                for dcost in shapes[gd]:
                    for n_p, n_d in DISAGG_RATIOS:
                        for thr in thresholds:
                            yield Layout((PoolPlan("prefill", shapes[gp][0], n_p),
                                          PoolPlan("decode", dcost, n_d)), thr)


def cpu_layouts(cost: CostModel, cores: int, threads: int, max_num_batched_tokens: int,
                max_num_seqs: int, thresholds: Sequence[int]) -> Iterator[Layout]:
    """A CPU machine of `cores` cores, `threads` per worker: every colocated count and every
    prefill/decode split of its workers."""
    workers = cores // threads
    if workers < 1:
        raise ConfigError(f"{cores} cores cannot hold a worker of {threads} threads")

    def pool(role: str, n: int) -> PoolPlan:
        return PoolPlan(role, cost, n, max_num_batched_tokens, max_num_seqs, threads)

    for n in range(1, workers + 1):
        yield Layout((pool("both", n),))
    for n_p in range(1, workers):
        for thr in thresholds:
            yield Layout((pool("prefill", n_p), pool("decode", workers - n_p)), thr)
