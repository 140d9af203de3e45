"""Next-layer gate lookahead with per-layer slots: the next MoE layer's router, applied to this
layer's MoE input, ranks that layer's experts, and the best ones are loaded while this layer and
the next one's attention run.

Why not LRU eviction under it: a decode step sweeps the layers in a cycle. When the budget is near
one step's working set, every slot a prefetch takes pushes out, under LRU, the oldest resident
expert, which is the one of the layers about to run: a cycle larger than the cache is LRU's worst
case, and prefetching makes the cycle larger. So this policy evicts by layer instead:

- an expert loaded for layer `l` replaces the lowest-ranked resident expert of `l` itself once
  `l` holds its share of the slots (`capacity // layers`);
- otherwise it takes a slot from the layer holding the most, and among those the layer whose
  next use is furthest away (the one that just ran);
- the latest prediction's experts are spared while any other can go;
- within a layer, rank is the latest prediction for it; an expert used since then ranks above
  every prediction until the next one for its layer (it is what that layer used last).

The policy prefetches every expert the next router picks for some token of the step, then the
best-ranked others up to one more than the layer's share, so a near-miss prediction still lands.
The ranking adds a bonus to resident experts: consecutive tokens share many experts, and a
resident one costs no read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from baton.actors.expert_policies import ExpertKey, LRUPolicy, RouterLogits

RESIDENT_BONUS = 1.0  # standardized router score added to an already resident expert
USED = float("inf")  # rank of an expert used since its layer was last predicted
EXTRA = 1  # experts predicted beyond a layer's share of the slots


class LookaheadPolicy(LRUPolicy):
    """Per-layer eviction ranked by the next layer's router; see the module docstring."""

    def __init__(self, routers: dict[int, RouterLogits], top_k: int, capacity: int,
                 num_experts: int) -> None:
        super().__init__()
        self._routers = routers
        self._layers = sorted(routers)
        self._pos = {layer: i for i, layer in enumerate(self._layers)}
        self._next = dict(zip(self._layers, self._layers[1:], strict=False))
        self._top_k = top_k
        self._num_experts = num_experts
        self.share = capacity // max(len(self._layers), 1)
        self._width = min(num_experts, max(self.share + EXTRA, top_k))
        self._held: Counter[int] = Counter()  # resident experts per layer
        self._resident: set[ExpertKey] = set()
        self._rank: dict[int, dict[int, float]] = {}  # layer -> expert -> latest predicted score
        self._current = self._layers[0] if self._layers else 0  # layer routed last
        self._wanted: frozenset[ExpertKey] = frozenset()  # the latest prediction: spared

    # -- called under the cache's lock ------------------------------------------------------------

    def touch(self, key: ExpertKey) -> None:
        super().touch(key)
        rank = self._rank.get(key[0], {})
        if rank.get(key[1]) != USED:
            self._rank[key[0]] = {**rank, key[1]: USED}

    def insert(self, key: ExpertKey) -> None:
        LRUPolicy.touch(self, key)  # arriving is not a use: it keeps its predicted rank
        self._held[key[0]] += 1
        self._resident.add(key)

    def forget(self, key: ExpertKey) -> None:
        super().forget(key)
        self._held[key[0]] -= 1
        self._resident.discard(key)

    def victim(self, candidates: Iterable[ExpertKey],
               incoming: ExpertKey | None = None) -> ExpertKey:
        spare = self._wanted
        allowed = [k for k in candidates if k not in spare] or list(candidates)
        layer = incoming[0] if incoming is not None else None
        if layer is not None and self.share and self._held[layer] >= self.share:
            same = [k for k in allowed if k[0] == layer]
            if same:
                return self._lowest(same)
        held = self._held
        # The fullest layer, and among equals the one whose next use is furthest away.
        worst = max({k[0] for k in allowed}, key=lambda i: (held[i], self._distance(i)))
        return self._lowest([k for k in allowed if k[0] == worst])

    # -- called by the forward, outside the lock --------------------------------------------------

    def route(self, layer: int, top_k_index: torch.Tensor) -> None:
        self._current = layer

    def predict(self, layer: int, hidden: torch.Tensor) -> list[ExpertKey]:
        nxt = self._next.get(layer)
        if nxt is None:
            return []
        logits = self._routers[nxt](hidden).float()
        if logits.shape[0] == 1:  # one token (decode at batch 1): a few floats, no tensor ops
            row = logits[0].tolist()
            mean = sum(row) / len(row)
            std = max((sum((v - mean) ** 2 for v in row) / max(len(row) - 1, 1)) ** 0.5, 1e-6)
            values = [(v - mean) / std for v in row]
            chosen = set(sorted(range(len(row)), key=lambda e: -row[e])[: self._top_k])
        else:  # a batch ranks experts by its tokens' mean standardized score
            z = (logits - logits.mean(-1, keepdim=True)) / logits.std(
                -1, keepdim=True).clamp_min(1e-6)
            values = z.mean(0).tolist()
            k = min(self._top_k, self._num_experts)
            chosen = set(logits.topk(k).indices.flatten().tolist())
        for e in range(self._num_experts):
            if (nxt, e) in self._resident:
                values[e] += RESIDENT_BONUS
        # Swapped whole: the cache reads ranks under its lock while the forward predicts.
        self._rank[nxt] = dict(enumerate(values))
        # Every expert some token's router would pick comes first, then the best of the rest.
        ranked = sorted(range(self._num_experts), key=lambda e: (e not in chosen, -values[e]))
        keys = [(nxt, e) for e in ranked[: max(self._width, len(chosen))]]
        self._wanted = frozenset(keys)
        return keys

    # -- inside -----------------------------------------------------------------------------------

    def _distance(self, layer: int) -> int:
        """Layers until `layer` runs again, from the one routed last (which is furthest)."""
        n = len(self._layers)
        return (self._pos.get(layer, 0) - self._pos.get(self._current, 0) - 1) % n

    def _lowest(self, keys: list[ExpertKey]) -> ExpertKey:
        """The lowest-ranked of `keys` (one layer's), the least recently used among equals."""
        rank = self._rank.get(keys[0][0], {})
        low = min(rank.get(k[1], -USED) for k in keys)
        tied = [k for k in keys if rank.get(k[1], -USED) == low]
        if len(tied) == 1:
            return tied[0]
        return next(k for k in self._order if k in tied)
