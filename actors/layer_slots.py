"""Per-layer expert slots ranked by a next-layer prediction: the eviction and prefetch that the
`lookahead` and `learned` policies share (they differ only in how they score the next layer).

At each MoE layer a policy scores the next MoE layer's experts from this layer's MoE input, and
the best ones are loaded while this layer and the next one's attention run.

Why not LRU eviction under it: a decode step sweeps the layers in a cycle. When the budget is near
one step's working set, every slot a prefetch takes pushes out, under LRU, the oldest resident
expert, which is the one of the layers about to run: a cycle larger than the cache is LRU's worst
case, and prefetching makes the cycle larger. So eviction goes by layer instead:

- an expert loaded for layer `l` replaces the lowest-ranked resident expert of `l` itself once
  `l` holds its share of the slots (`capacity // layers`);
- otherwise it takes a slot from the layer holding the most, and among those the layer whose
  next use is furthest away (the one that just ran);
- the latest prediction's experts are spared while any other can go;
- within a layer, rank is the latest prediction for it; an expert used since then ranks above
  every prediction until the next one for its layer (it is what that layer used last).

A prediction names every expert the scores put in some token's top-k, then the best-ranked others
up to top-k plus one, so a near-miss still lands (more, measured, read more experts that go
unused than it saves). The ranking adds a bonus to
resident experts: consecutive tokens share many experts, and a resident one costs no read.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from baton.actors.expert_policies import ExpertKey, LRUPolicy

RESIDENT_BONUS = 1.0  # standardized score added to an already resident expert
USED = float("inf")  # rank of an expert used since its layer was last predicted
EXTRA = 1  # experts predicted beyond top-k


class LayerSlotsPolicy(LRUPolicy):
    """Per-layer eviction ranked by a next-layer prediction; subclasses score the next layer
    (`next_scores`). See the module docstring."""

    def __init__(self, layers: list[int], top_k: int, capacity: int, num_experts: int) -> None:
        super().__init__()
        self._layers = sorted(layers)
        self._pos = {layer: i for i, layer in enumerate(self._layers)}
        self._next = dict(zip(self._layers, self._layers[1:], strict=False))
        self._top_k = top_k
        self._num_experts = num_experts
        self.share = capacity // max(len(self._layers), 1)
        self._width = min(num_experts, top_k + EXTRA)
        self._rank: dict[int, dict[int, float]] = {}  # layer -> expert -> latest predicted score
        self._current = self._layers[0] if self._layers else 0  # layer routed last
        self._wanted: frozenset[ExpertKey] = frozenset()  # the latest prediction: spared
        self._by_layer: dict[int, set[ExpertKey]] = {}  # resident experts of each layer

    # -- called under the cache's lock ------------------------------------------------------------

    def touch(self, key: ExpertKey) -> None:
        super().touch(key)
        rank = self._rank.get(key[0], {})
        if rank.get(key[1]) != USED:
            self._rank[key[0]] = {**rank, key[1]: USED}

    def insert(self, key: ExpertKey) -> None:
        LRUPolicy.touch(self, key)  # arriving is not a use: it keeps its predicted rank
        self._by_layer.setdefault(key[0], set()).add(key)

    def forget(self, key: ExpertKey) -> None:
        super().forget(key)
        self._by_layer.get(key[0], set()).discard(key)

    def victim(self, candidates: Iterable[ExpertKey],
               incoming: ExpertKey | None = None) -> ExpertKey:
        evictable = candidates if isinstance(candidates, dict | set | frozenset) else \
            set(candidates)
        layer = incoming[0] if incoming is not None else None
        at_share = layer is not None and self.share and \
            len(self._by_layer.get(layer, ())) >= self.share
        fullest: list[int] | None = None
        for spare in (self._wanted, frozenset()):  # the prediction goes last
            if at_share:
                same = self._evictable(layer, evictable, spare)
                if same:
                    return self._lowest(same)
            if fullest is None:
                fullest = self._fullest_first()
            for other in fullest:
                keys = self._evictable(other, evictable, spare)
                if keys:
                    return self._lowest(keys)
        return next(iter(evictable))  # resident but unknown to the policy: stay total anyway

    def _fullest_first(self) -> list[int]:
        """Layers by how many experts they hold, most first; among equals the furthest from
        their next use first (walking back from the layer routed last meets them in that
        order, and the sort keeps it)."""
        n, at = len(self._layers), self._pos.get(self._current, 0)
        return sorted((self._layers[(at - i) % n] for i in range(n)),
                      key=lambda i: -len(self._by_layer.get(i, ())))

    def _evictable(self, layer: int, evictable, spare: frozenset[ExpertKey]) -> list[ExpertKey]:
        return [k for k in self._by_layer.get(layer, ()) if k in evictable and k not in spare]

    # -- called by the forward, outside the lock --------------------------------------------------

    def route(self, layer: int, top_k_index: torch.Tensor) -> None:
        self._current = layer

    def predict(self, layer: int, hidden: torch.Tensor) -> list[ExpertKey]:
        nxt = self._next.get(layer)
        if nxt is None:
            return []
        scored = self.next_scores(layer, nxt, hidden)
        if scored is None:
            return []
        logits = scored.float()
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
        resident = self._by_layer.get(nxt, set())  # only tested, never iterated, out here
        for e in range(self._num_experts):
            if (nxt, e) in resident:
                values[e] += RESIDENT_BONUS
        # Swapped whole: the cache reads ranks under its lock while the forward predicts.
        self._rank[nxt] = dict(enumerate(values))
        # Every expert some token's router would pick comes first, then the best of the rest.
        ranked = sorted(range(self._num_experts), key=lambda e: (e not in chosen, -values[e]))
        keys = [(nxt, e) for e in ranked[: max(self._width, len(chosen))]]
        self._wanted = frozenset(keys)
        return keys

    def next_scores(self, layer: int, nxt: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """`[T, E]` scores of layer `nxt`'s experts (higher: likelier chosen) for layer
        `layer`'s MoE inputs `hidden [T, H]` (or one row for the whole step); None: no
        prediction."""
        raise NotImplementedError

    # -- inside -----------------------------------------------------------------------------------

    def _lowest(self, keys: list[ExpertKey]) -> ExpertKey:
        """The lowest-ranked of `keys` (one layer's), the least recently used among equals."""
        rank = self._rank.get(keys[0][0], {})
        low = min(rank.get(k[1], -USED) for k in keys)
        tied = [k for k in keys if rank.get(k[1], -USED) == low]
        if len(tied) == 1:
            return tied[0]
        return next(k for k in self._order if k in tied)
