"""Trace-similarity prefetch (MoE-Infinity): the experts past forward steps used next, after
starting the way this step did.

The policy keeps this step's expert activation matrix (MoE layers x experts, the share of the
batch's tokens routed to each expert) and a bounded library of past steps' matrices. At layer `l`
it matches the rows up to `l` against the same rows of every past trace (cosine), and prefetches
the next layers' experts that the best matches used, weighted by their similarity. A forward step
ends where the layer index goes back (the next step starts again at the first MoE layer).
"""

from __future__ import annotations

import torch

from baton.actors.expert_policies import ExpertKey, PredictiveLRU

LIBRARY_SIZE = 256  # past steps kept; the oldest makes room
MATCHES = 4  # best-matching past steps that vote
DEPTH = 2  # MoE layers ahead to prefetch


class TracePolicy(PredictiveLRU):
    """LRU eviction sparing predicted experts; prefetches by matching this step's partial
    activation trace against a library of past steps' traces."""

    def __init__(self, layers: list[int], num_experts: int, capacity: int,
                 library_size: int = LIBRARY_SIZE, matches: int = MATCHES,
                 depth: int = DEPTH) -> None:
        super().__init__(capacity)
        self.layers = sorted(layers)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._matches = matches
        self._depth = depth
        self._library = torch.zeros(library_size, len(layers), num_experts)
        self._filled = 0  # traces in the library
        self._next = 0  # where the next finished trace goes (a ring)
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

    def predict(self, layer: int, hidden: torch.Tensor) -> list[ExpertKey]:
        row = self._row[layer]
        ahead = self.layers[row + 1 : row + 1 + self._depth]
        if not ahead or self._filled == 0:
            return self._bounded([])
        past = self._library[: self._filled, : row + 1].flatten(1)
        now = self._trace[: row + 1].flatten()
        sims = past @ now / (past.norm(dim=1) * now.norm()).clamp_min(1e-12)
        best = torch.topk(sims, min(self._matches, self._filled))
        weights = best.values.clamp_min(0)
        if not bool(weights.any()):
            return self._bounded([])
        keys: list[ExpertKey] = []
        for offset, nxt in enumerate(ahead, start=row + 1):
            rows = self._library[best.indices, offset]  # [matches, E]
            scores = weights @ rows
            # As many experts as the matches used there, on average: the batch's likely width.
            width = int(torch.ceil((weights @ (rows > 0).float().sum(dim=1)) / weights.sum()))
            order = torch.argsort(scores, descending=True, stable=True)[:width].tolist()
            keys += [(nxt, e) for e in order if scores[e] > 0]
        return self._bounded(keys)

    def _finish_step(self) -> None:
        if self._last >= 0:
            self._library[self._next] = self._trace
            self._next = (self._next + 1) % self._library.shape[0]
            self._filled = min(self._filled + 1, self._library.shape[0])
        self._trace = torch.zeros_like(self._trace)
        self._last = -1
