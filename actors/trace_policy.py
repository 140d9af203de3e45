"""Trace-similarity prefetch (MoE-Infinity): the experts that past requests like this one used.

Each running request keeps its expert activation matrix (MoE layers x experts: how often its
tokens chose each expert, summed over every step it ran so far). A finished request's matrix, each
layer's row normalized to shares, joins a bounded library. At layer `l` of a step, each request in
the batch is matched against the library (cosine over the whole matrix: the rows its earlier steps
filled and this step's rows up to `l`), and the best matches vote on the next layer's experts,
weighted by their similarity. Until the library has a match, a request's own history votes
(what it chose at that layer before). The engine names each step's requests and their rows
(`begin_step`) and the requests that ended (`end_request`); without that, the batch counts as one
request that ends when the next forward starts. Eviction and prefetch are `LayerSlotsPolicy`'s.
"""

from __future__ import annotations

import torch

from baton.actors.layer_slots import LayerSlotsPolicy

LIBRARY_SIZE = 256  # finished requests kept; the oldest makes room
MATCHES = 4  # best-matching past requests that vote
ANONYMOUS = ""  # the request of a forward the engine did not describe


class TracePolicy(LayerSlotsPolicy):
    """Scores the next layer by matching each request's activation matrix so far against a
    library of finished requests' matrices."""

    def __init__(self, layers: list[int], num_experts: int, top_k: int, capacity: int,
                 library_size: int = LIBRARY_SIZE, matches: int = MATCHES) -> None:
        super().__init__(layers, top_k, capacity, num_experts)
        self.layers = sorted(layers)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._matches = matches
        self._library = torch.zeros(library_size, len(layers) * num_experts)
        self._filled = 0  # matrices in the library
        self._next_slot = 0  # where the next finished matrix goes (a ring)
        self._active: dict[str, torch.Tensor] = {}  # request -> its counts [layers, experts]
        self._spans: list[tuple[str, int, int]] = []  # this forward: (request, first row, end)
        self._described = False  # whether the engine named this forward's requests

    @property
    def traces(self) -> int:
        """Finished requests' matrices in the library."""
        return self._filled

    # -- what the engine says ----------------------------------------------------------------------

    def begin_step(self, requests: list[tuple[str, int]]) -> None:
        """The next forward runs `requests` in row order, each with its number of rows."""
        spans, at = [], 0
        for rid, rows in requests:
            spans.append((rid, at, at + rows))
            at += rows
        self._spans = spans
        self._described = True

    def end_request(self, request_id: str) -> None:
        """`request_id` ended: its matrix joins the library."""
        counts = self._active.pop(request_id, None)
        if counts is None or not bool(counts.any()):
            return
        shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
        self._library[self._next_slot] = shares.flatten()
        self._next_slot = (self._next_slot + 1) % self._library.shape[0]
        self._filled = min(self._filled + 1, self._library.shape[0])

    # -- the forward -------------------------------------------------------------------------------

    def route(self, layer: int, top_k_index: torch.Tensor) -> None:
        super().route(layer, top_k_index)
        row = self._row[layer]
        if row == 0 and not self._described:  # a forward nobody described: one request
            self.end_request(ANONYMOUS)
            self._spans = [(ANONYMOUS, 0, top_k_index.shape[0])]
        if row == len(self.layers) - 1:
            self._described = False  # the next forward needs describing again
        chosen = top_k_index.cpu()
        num_experts = self._library.shape[1] // len(self.layers)
        for rid, first, end in self._spans:
            counts = self._active.get(rid)
            if counts is None:
                counts = self._active[rid] = torch.zeros(len(self.layers), num_experts)
            counts[row] += torch.bincount(chosen[first:end].flatten(), minlength=num_experts)

    def next_scores(self, layer: int, nxt: int, hidden: torch.Tensor) -> torch.Tensor | None:
        rows = [self._vote(rid, self._row[nxt]) for rid, _, _ in self._spans]
        rows = [r for r in rows if r is not None]
        return torch.stack(rows) if rows else None

    def _vote(self, rid: str, nxt_row: int) -> torch.Tensor | None:
        """Request `rid`'s scores for the layer at `nxt_row`."""
        counts = self._active.get(rid)
        if counts is None:
            return None
        if self._filled:
            now = (counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)).flatten()
            past = self._library[: self._filled]
            sims = past @ now / (past.norm(dim=1) * now.norm()).clamp_min(1e-12)
            best = torch.topk(sims, min(self._matches, self._filled))
            weights = best.values.clamp_min(0)
            if bool(weights.any()):
                width = counts.shape[1]
                return weights @ past[best.indices, nxt_row * width:(nxt_row + 1) * width]
        own = counts[nxt_row]
        return own if bool(own.any()) else None
