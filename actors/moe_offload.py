"""MoE expert offload: the model's experts leave the device, a budgeted cache serves the forward.

`enable_offload(model, config, device)` moves every MoE layer's fused experts into a store (host
memory or disk), builds the expert cache and its policy, and switches the model's experts
implementation to "baton_offload": each layer computes only the experts its tokens chose, from the
cache's slots, in the same order of operations as transformers' grouped path, so greedy tokens
and float32 logits match the all-resident model exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import closing
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from baton.actors.expert_cache import ExpertCache
from baton.actors.expert_cache_aio import AioExpertCache
from baton.actors.expert_policies import ExpertPolicy, RouterLogits
from baton.actors.expert_policy_setup import PolicyInputs, make_policy
from baton.actors.expert_store import DiskStore, ExpertStore, HostStore, take_experts
from baton.actors.moe_experts import (
    by_expert,
    check_fused_layout,
    combine,
    expert_mlp,
    use_skinny,
)
from baton.actors.pregate import PregateRouter
from baton.actors.pregate import find as find_pregate
from baton.actors.routing_predictor import ModelShape
from baton.engine_config import MoEOffloadConfig
from baton.errors import ConfigError, ModelLoadError
from baton.kernels.dispatch import backend
from baton.kernels.moe import expert_pairs_grouped, sum_pairs
from baton.outputs import ExpertCacheUse

log = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "baton_offload"
_NONE_LOADING: frozenset[int] = frozenset()


@dataclass(slots=True)
class MoELayer:
    """One decoder layer's MoE parts: its index, experts module and router (when found)."""

    index: int
    experts: torch.nn.Module
    router: torch.nn.Module | None


def moe_layers(model) -> list[MoELayer]:
    """The decoder layers whose MLP holds fused experts (`gate_up_proj [E, 2I, H]`)."""
    found = []
    for i, layer in enumerate(model.get_decoder().layers):
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is not None and getattr(experts, "gate_up_proj", None) is not None:
            found.append(MoELayer(i, experts, getattr(mlp, "gate", None)))
    return found


@dataclass(slots=True)
class MoEOffload:
    """The offloaded experts of one model: store, cache, policy, and what they report."""

    layers: list[MoELayer]
    store: ExpertStore
    cache: ExpertCache
    policy: ExpertPolicy
    tier: str

    def stats(self) -> dict[str, float | int | str]:
        """Cache counters and rates, plus where experts live and how much fits."""
        return {
            "tier": self.tier,
            "policy": type(self.policy).__name__,
            "capacity_experts": self.cache.capacity,
            "total_experts": len(self.layers) * self.store.num_experts,
            "budget_bytes": self.cache.budget_bytes,
            **self.cache.snapshot(),
        }

    def use(self) -> ExpertCacheUse:
        """The cache's counters so far, read consistently: subtract two reads for a span's use."""
        s = self.cache.snapshot()
        return ExpertCacheUse(hits=int(s["hits"]), misses=int(s["misses"]),
                              bytes_loaded=int(s["bytes_loaded"]),
                              stall_seconds=float(s["stall_seconds"]))

    def close(self) -> None:
        self.cache.close()
        self.store.close()


def enable_offload(model, config: MoEOffloadConfig, device: torch.device,
                   model_name: str = "the model") -> MoEOffload:
    """Offload `model`'s experts as `config` says; raises `ConfigError` for a dense model or a
    budget below one expert, `ModelLoadError` for an experts layout Baton cannot serve."""
    layers = moe_layers(model)
    if not layers:
        raise ConfigError(f"moe_offload is set but {model_name} has no Mixture-of-Experts layers "
                          "(no fused experts); remove moe_offload for a dense model")
    for layer in layers:
        check_fused_layout(layer.experts, "Baton's expert offload")
    top_k = _top_k(model)
    stacked = {layer.index: take_experts(layer.experts) for layer in layers}
    if device.type == "cpu" and backend(device) == "torch":  # the resident CPU path's layout
        for layer in layers:
            use_skinny(layer.experts, *stacked[layer.index])
    if len({(gu.shape, d.shape, gu.dtype) for gu, d in stacked.values()}) != 1:
        raise ModelLoadError("MoE layers of different expert shapes cannot share one expert cache")
    store: ExpertStore
    if config.tier == "disk":
        store = DiskStore(stacked, config.dir)
    else:
        store = HostStore(stacked, pin=device.type == "cuda")
    del stacked
    capacity = _capacity(config.budget, store, len(layers))
    routers = {layer.index: scores for layer in layers
               if (scores := router_scores(layer.router)) is not None}
    shape = ModelShape(tuple(layer.index for layer in layers), store.num_experts, top_k,
                       store.shape.gate_up[-1])
    policy = make_policy(config, PolicyInputs(routers, shape, capacity, device, model_name,
                                              find_pregate(model)))
    cache_type = AioExpertCache if device.type == "cpu" and store.async_reads else ExpertCache
    cache = cache_type(store, capacity, device, policy)
    for layer in layers:
        layer.experts._baton_offload = (cache, layer.index)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    log.info("MoE experts offloaded to %s: %d of %d resident (%d bytes each), policy %s",
             config.tier, capacity, len(layers) * store.num_experts, store.shape.nbytes,
             config.policy)
    return MoEOffload(layers, store, cache, policy, config.tier)


def _top_k(model) -> int:
    text = model.config.get_text_config()
    return int(getattr(text, "num_experts_per_tok", None) or getattr(text, "top_k", 1))


def _capacity(budget: int | float, store: ExpertStore, num_layers: int) -> int:
    """Expert slots that `budget` (bytes, or a fraction of all experts) pays for."""
    per_expert = store.shape.nbytes
    total = num_layers * store.num_experts
    nbytes = int(budget * total * per_expert) if isinstance(budget, float) else budget
    slots = min(nbytes // per_expert, total)
    if slots < 1:
        raise ConfigError(
            f"moe_offload.budget {budget!r} is {nbytes} bytes, smaller than one expert "
            f"({per_expert} bytes); give at least {per_expert} bytes or a fraction >= "
            f"{1 / total:.4g}")
    return slots


def router_scores(router: torch.nn.Module | None, float32: bool = False) -> RouterLogits | None:
    """What `router` scores for a batch of its layer's MoE inputs (a pre-gated layer's were
    decided at the first MoE layer), in the model's dtype or in float32; None for a router
    without weights."""
    if isinstance(router, PregateRouter):
        return router.decided_logits  # float32 already
    weight = getattr(router, "weight", None)
    if weight is None:
        return None

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        w = weight.detach().float() if float32 else weight
        return F.linear(hidden.reshape(-1, w.shape[-1]).to(w.dtype), w)

    return logits


def _parts(cache, layer: int, hit: list[int], predicted
           ) -> Iterator[tuple[list[int], list[int], AbstractSet[int]]]:
    """`hit`'s experts a cache's worth at a time: (experts, their slots, those of the slots
    still loading), the slots held while the caller computes with them and released after.
    Iterate it inside `closing`, so that a failed part releases its slots at once."""
    settled = cache.settled(layer, hit, predicted)
    if settled is not None:  # all resident and read, nothing to load: no pins to hold
        yield hit, settled, _NONE_LOADING
        return
    for first in range(0, len(hit), cache.capacity):
        chunk = hit[first : first + cache.capacity]
        slots = cache.acquire(layer, chunk)
        if first + cache.capacity >= len(hit):
            # Only now: this layer's experts are all used or pinned, so a prefetch evicts none
            # that it still needs, and loads while this layer and the next one's attention run.
            cache.prefetch(predicted)
        try:
            yield chunk, slots, cache.loading_among(slots)
        finally:
            cache.release(slots)


def offload_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward over the expert cache: `hidden_states [T, H]`, top-k index
    and weights `[T, k]`. The arithmetic of the resident CPU path (`moe_experts`): tokens sorted
    by expert, one matmul pair per expert chosen, weighted, unsorted, summed over k."""
    cache, layer = self._baton_offload
    cache.policy.route(layer, top_k_index)
    predicted = cache.policy.predict(layer, hidden_states)
    if backend(hidden_states.device) == "triton":
        return _grouped_over_slots(self, cache, layer, predicted, hidden_states, top_k_index,
                                   top_k_weights)
    order = by_expert(top_k_index, self.num_experts)
    x = hidden_states[order.perm // top_k_index.shape[-1]]
    out = torch.empty(x.shape[0], hidden_states.shape[-1], dtype=hidden_states.dtype,
                      device=hidden_states.device)
    with closing(_parts(cache, layer, order.hit, predicted)) as parts:
        for chunk, slots, loading in parts:
            pairs = list(zip(chunk, slots, strict=True))
            if loading:  # experts already resident first: the others' reads go on meanwhile
                pairs.sort(key=lambda pair: pair[1] in loading)
            for e, slot in pairs:
                if slot in loading:
                    cache.ready(slot)
                rows = order.rows(e)
                out[rows] = expert_mlp(self, x[rows], cache.gate_up[slot], cache.down[slot])
    return combine(out, order, top_k_weights, hidden_states.dtype)


def _grouped_over_slots(experts, cache, layer: int, predicted, hidden_states: torch.Tensor,
                        top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The resident model's grouped GEMM (`kernels.moe`) over the cache's slots, so the bits
    are the resident model's: each part's pairs get their experts' slot ids, the others the
    dropped id, and each pair's row, computed once, is summed per token as the resident path
    sums it."""
    s, top_k = top_k_index.shape
    pairs = None
    hit = torch.unique(top_k_index).tolist()
    with closing(_parts(cache, layer, hit, predicted)) as parts:
        for chunk, slots, loading in parts:
            for slot in loading:
                cache.ready(slot)
            slot_of = torch.full((experts.num_experts,), cache.capacity, dtype=top_k_index.dtype)
            slot_of[chunk] = torch.tensor(slots, dtype=top_k_index.dtype)
            ids = slot_of.to(top_k_index.device)[top_k_index]
            part = expert_pairs_grouped(hidden_states, ids, top_k_weights, cache.gate_up,
                                        cache.down, experts._apply_gate)
            pairs = part if pairs is None else pairs + part  # zero but in its expert's part
    assert pairs is not None
    return sum_pairs(pairs, s, top_k, hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, offload_experts_forward)
