"""Pre-gated prefetch (Read-ME): on a model whose one router decides every layer's experts at the
first MoE layer (`actors/pregate.py`), every later layer's experts are known exactly before the
forward reaches them, so loading them all starts at that first layer (each later layer tops the
reads up, as many as the store keeps in flight) and they arrive while the layers in between
compute. Eviction is `LayerSlotsPolicy`'s: a layer beyond its share of the slots replaces
its own experts that this forward does not use.

At most a layer's share is loaded ahead for it: when a batch's tokens need more of a layer's
experts than that (several tokens, a small budget), the ones most tokens chose come first and the
rest load when the layer runs, so a prefetch never pushes out another one that is still to be used.
"""

from __future__ import annotations

import torch

from baton.actors.expert_policies import ExpertKey
from baton.actors.layer_slots import LayerSlotsPolicy
from baton.actors.pregate import Pregate

CHOSEN = 1e6  # rank of an expert this forward uses, plus how many of its tokens chose it


class PregatePolicy(LayerSlotsPolicy):
    """Loads every later layer's chosen experts at the first MoE layer."""

    def __init__(self, pregate: Pregate, layers: list[int], capacity: int) -> None:
        super().__init__(layers, pregate.top_k, capacity, pregate.num_experts)
        self._pregate = pregate
        self._plan: list[ExpertKey] = []  # this forward's experts to load ahead, in layer order

    def predict(self, layer: int, hidden: torch.Tensor) -> list[ExpertKey]:
        if not self._layers:
            return []
        if layer != self._layers[0]:
            # What is still to come of this forward's plan: the cache skips the resident ones
            # and starts the rest as its reads and slots allow.
            return [key for key in self._plan if key[0] > layer]
        logits = self._pregate.logits.float()  # [T, L, E]
        indices = self._pregate.indices  # [T, L, k]
        per_layer = max(self.share, 1)
        keys: list[ExpertKey] = []
        for row, nxt in enumerate(self._layers[1:], start=1):
            counts = torch.bincount(indices[:, row].flatten().cpu(),
                                    minlength=self._num_experts).tolist()
            mean = logits[:, row].mean(0).tolist()
            rank = {e: (CHOSEN + counts[e] if counts[e] else mean[e])
                    for e in range(self._num_experts)}
            self._rank[nxt] = rank  # swapped whole: the cache reads ranks under its lock
            chosen = sorted((e for e in range(self._num_experts) if counts[e]),
                            key=lambda e: -rank[e])
            keys += [(nxt, e) for e in chosen[:per_layer]]
        self._wanted = frozenset(keys)
        self._plan = keys
        return keys

    def next_scores(self, layer: int, nxt: int, hidden: torch.Tensor) -> torch.Tensor | None:
        return None  # `predict` reads the pre-gate's decision directly
