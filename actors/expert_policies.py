"""Expert cache policies: which resident expert to evict, and which experts to fetch ahead.

A policy sees every use of an expert (`touch`), every expert that enters or leaves the cache
(`insert`, `forget`), chooses a victim among the evictable ones, sees which experts each layer's
tokens chose (`route`), and may name experts to prefetch from a layer's MoE input (`predict`).
The engine names each forward's requests (`begin_step`) and the requests that end
(`end_request`), for policies that keep per-request history.
The forward calls `route` then `predict` for a layer, outside the cache's lock (a policy that
shares state between those and the rest swaps whole references); the cache calls the rest under
its own lock, so a policy needs no locking of its own.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

import torch

ExpertKey = tuple[int, int]  # (layer, expert)

# layer -> what its router scores for a batch of MoE inputs: `[T, H]` -> `[T, E]` logits.
RouterLogits = Callable[[torch.Tensor], torch.Tensor]


class ExpertPolicy:
    """Eviction order plus prefetch predictions; the default predicts nothing."""

    def touch(self, key: ExpertKey) -> None:
        """`key` was used by a forward pass."""

    def insert(self, key: ExpertKey) -> None:
        """`key` became resident (a miss or a prefetch)."""
        self.touch(key)

    def forget(self, key: ExpertKey) -> None:
        """`key` was evicted."""

    def victim(self, candidates: Iterable[ExpertKey],
               incoming: ExpertKey | None = None) -> ExpertKey:
        """The resident expert to evict among `candidates` (never empty) to make room for
        `incoming`."""
        raise NotImplementedError

    def route(self, layer: int, top_k_index: torch.Tensor) -> None:
        """Layer `layer`'s tokens chose `top_k_index [T, k]` (called before its `predict`)."""

    def predict(self, layer: int, hidden: torch.Tensor) -> list[ExpertKey]:
        """Experts worth loading now, seeing layer `layer`'s MoE input `[T, H]`."""
        return []

    def begin_step(self, requests: list[tuple[str, int]]) -> None:
        """The next forward runs `requests` (id, rows) in row order (the engine says so)."""

    def end_request(self, request_id: str) -> None:
        """`request_id` finished, failed or was aborted."""


class LRUPolicy(ExpertPolicy):
    """Evict the expert unused for longest (Mixtral-offloading's baseline)."""

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def touch(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Iterable[ExpertKey],
               incoming: ExpertKey | None = None) -> ExpertKey:
        allowed = set(candidates)
        for key in self._order:
            if key in allowed:
                return key
        return min(allowed)  # resident but never touched: cannot happen, stay total anyway


class LFUPolicy(ExpertPolicy):
    """Evict the expert used least often since the engine started; ties go to the least recent.

    Counts survive eviction, so an expert that is popular overall is kept once it returns.
    """

    def __init__(self) -> None:
        self._uses: Counter[ExpertKey] = Counter()
        self._recency = LRUPolicy()

    def touch(self, key: ExpertKey) -> None:
        self._uses[key] += 1
        self._recency.touch(key)

    def insert(self, key: ExpertKey) -> None:
        self._recency.touch(key)

    def forget(self, key: ExpertKey) -> None:
        self._recency.forget(key)

    def victim(self, candidates: Iterable[ExpertKey],
               incoming: ExpertKey | None = None) -> ExpertKey:
        allowed = list(candidates)
        fewest = min(self._uses[k] for k in allowed)
        return self._recency.victim(k for k in allowed if self._uses[k] == fewest)
