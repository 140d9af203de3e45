"""Trace-similarity prefetch (MoE-Infinity): the experts past forward steps used next, after
starting the way this step did.

The policy keeps this step's expert activation matrix (MoE layers x experts, the share of the
batch's tokens routed to each expert) and a bounded library of past steps' matrices. At layer `l`
it matches the rows up to `l` against the same rows of every past trace (cosine), and scores the
next layer's experts by what the best matches used there, weighted by their similarity. A forward
step ends where the layer index goes back (the next step starts again at the first MoE layer).
Eviction and prefetch are `LayerSlotsPolicy`'s.
"""

from __future__ import annotations

import torch

from baton.actors.layer_slots import LayerSlotsPolicy

LIBRARY_SIZE = 256  # past steps kept; the oldest makes room
MATCHES = 4  # best-matching past steps that vote


class TracePolicy(LayerSlotsPolicy):
    """Scores the next layer by matching this step's partial activation trace against a library
    of past steps' traces."""

    def __init__(self, layers: list[int], num_experts: int, top_k: int, capacity: int,
                 library_size: int = LIBRARY_SIZE, matches: int = MATCHES) -> None:
        super().__init__(layers, top_k, capacity, num_experts)
        self.layers = sorted(layers)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._matches = matches
        self._library = torch.zeros(library_size, len(layers), num_experts)
        self._filled = 0  # traces in the library
        self._next_slot = 0  # where the next finished trace goes (a ring)
        self._trace = torch.zeros(len(layers), num_experts)
        self._last = -1  # row of the last layer routed in this step

    def route(self, layer: int, top_k_index: torch.Tensor) -> None:
        super().route(layer, top_k_index)
        row = self._row[layer]
        if row <= self._last:
            self._finish_step()
        counts = torch.bincount(top_k_index.flatten().cpu(), minlength=self._trace.shape[1])
        self._trace[row] = counts.float() / max(int(counts.sum()), 1)
        self._last = row

    def next_scores(self, layer: int, nxt: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if self._filled == 0:
            return None
        row = self._row[layer]
        past = self._library[: self._filled, : row + 1].flatten(1)
        now = self._trace[: row + 1].flatten()
        sims = past @ now / (past.norm(dim=1) * now.norm()).clamp_min(1e-12)
        best = torch.topk(sims, min(self._matches, self._filled))
        weights = best.values.clamp_min(0)
        if not bool(weights.any()):
            return None
        return (weights @ self._library[best.indices, self._row[nxt]]).unsqueeze(0)

    def _finish_step(self) -> None:
        if self._last >= 0:
            self._library[self._next_slot] = self._trace
            self._next_slot = (self._next_slot + 1) % self._library.shape[0]
            self._filled = min(self._filled + 1, self._library.shape[0])
        self._trace = torch.zeros_like(self._trace)
        self._last = -1
