"""Pre-gated prefetch (Read-ME): on a model whose one router decides every layer's experts at the
first MoE layer (`actors/pregate.py`), every later layer's experts are known exactly before the
forward reaches them.

- Prefetch: at each MoE layer, the experts the rest of this forward uses, in layer order, as many
  as the cache holds beside this layer's own (the cache skips resident ones and starts the rest
  as its reads allow; each later layer tops them up). At batch 1 within a quarter of all experts
  that is the whole forward, planned at its first MoE layer; when a batch's tokens need more, the
  plan is a window that slides forward one layer at a time.
- Eviction, knowing the rest of the forward: an expert this forward no longer uses goes first,
  the one of the latest layer (its next use, in the next forward, is furthest away), the least
  recently used among a layer's; an expert still to be used goes only when nothing else can, the
  one of the furthest layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch

from baton.actors.expert_policies import ExpertKey, ExpertPolicy
from baton.actors.pregate import Pregate


class PregatePolicy(ExpertPolicy):
    """Loads the rest of the forward's experts ahead; evicts knowing which are still to come."""

    def __init__(self, pregate: Pregate, layers: list[int], capacity: int) -> None:
        self._pregate = pregate
        self._layers = sorted(layers)
        self._pos = {layer: i for i, layer in enumerate(self._layers)}
        self._capacity = capacity
        self._current = self._layers[0] if self._layers else 0  # the layer routed last
        self._plan: list[ExpertKey] = []  # this forward's experts, in layer order
        self._planned: dict[ExpertKey, int] = {}  # the plan's experts -> their layer's position
        self._after: dict[int, int] = {}  # layer -> where the plan's later layers start in it
        self._uses: dict[int, int] = {}  # layer -> how many experts this forward uses there
        self._by_layer: dict[int, OrderedDict[ExpertKey, None]] = {}  # resident, LRU first
        self._scan_at, self._scan = -1, -1  # `victim`'s layer position and where its scan is
        self._resident: set[ExpertKey] = set()  # inserted and not forgotten
        self._loaded_upto = 0  # the plan's experts before this index are all resident
        self._forgets = 0  # planned experts forgotten so far

    def route(self, layer: int, top_k_index: torch.Tensor) -> None:
        self._current = layer
        if layer != self._layers[0]:
            return
        chosen = self._pregate.indices.cpu()  # [T, L, k]: the decision for the whole forward
        num_layers, num_experts = chosen.shape[1], self._pregate.num_experts
        # How often each layer's experts were chosen, [L, E], in one pass over the decision;
        # most-chosen first (if the window cuts a layer, its least-used experts wait), ties in
        # expert order.
        cells = chosen + torch.arange(num_layers).view(1, -1, 1) * num_experts
        per_layer = torch.bincount(cells.flatten(), minlength=num_layers * num_experts)
        counts, ranked = per_layer.view(num_layers, num_experts).sort(dim=1, descending=True,
                                                                       stable=True)
        used = (counts > 0).sum(dim=1).tolist()
        plan: list[ExpertKey] = []
        planned: dict[ExpertKey, int] = {}
        after, uses = {}, {}
        for row, (each, experts, n) in enumerate(zip(self._layers, ranked.tolist(), used,
                                                     strict=True)):
            keys = [(each, e) for e in experts[:n]]
            plan += keys
            planned.update(dict.fromkeys(keys, row))
            after[each], uses[each] = len(plan), n
        # Swapped whole: the cache reads them under its lock.
        self._plan, self._planned, self._after, self._uses = plan, planned, after, uses
        self._scan_at = -1  # a new plan: every layer may hold experts it no longer uses
        self._loaded_upto = 0

    def predict(self, layer: int, hidden: torch.Tensor) -> list[ExpertKey]:
        room = max(self._capacity - self._uses.get(layer, 0), 0)
        start = self._after.get(layer, len(self._plan))
        # The cache skips resident experts; those at the plan's head are skipped here already,
        # so a layer whose plan is all in costs nothing to prefetch.
        plan, done, forgets = self._plan, self._loaded_upto, self._forgets
        while done < len(plan) and plan[done] in self._resident:
            done += 1
        if forgets == self._forgets:  # else a loader thread evicted one meanwhile: rescan
            self._loaded_upto = done
        return plan[max(start, done):start + room]

    def insert(self, key: ExpertKey) -> None:
        self._resident.add(key)
        self.touch(key)

    def touch(self, key: ExpertKey) -> None:
        bucket = self._by_layer.setdefault(key[0], OrderedDict())
        bucket[key] = None
        bucket.move_to_end(key)

    def forget(self, key: ExpertKey) -> None:
        self._by_layer.get(key[0], {}).pop(key, None)
        self._resident.discard(key)
        if key in self._planned:  # a planned expert left: look for it again
            self._forgets += 1
            self._loaded_upto = 0

    def victim(self, candidates: Iterable[ExpertKey],
               incoming: ExpertKey | None = None) -> ExpertKey:
        allowed = candidates if isinstance(candidates, (dict, set)) else set(candidates)
        at, planned = self._pos.get(self._current, 0), self._planned
        if self._scan_at != at:
            self._scan_at, self._scan = at, len(self._layers) - 1
        # Not used again this pass: the latest layer's first, least recently used within it.
        # While the forward stays at one layer no layer gains such an expert (those it loads
        # are planned, those it pins are its own), so the scan goes on from where it stopped.
        while self._scan >= 0:
            for key in self._by_layer.get(self._layers[self._scan], ()):
                if key in allowed and planned.get(key, -1) < at:
                    return key
            self._scan -= 1
        return max(allowed, key=lambda key: self._pos.get(key[0], 0))
