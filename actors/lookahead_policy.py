"""Next-layer gate lookahead: the next MoE layer's own router, applied to this layer's MoE input,
scores that layer's experts (the residual stream changes little from one layer to the next).
Eviction and prefetch are `LayerSlotsPolicy`'s."""

from __future__ import annotations

import torch

from baton.actors.expert_policies import RouterLogits
from baton.actors.layer_slots import LayerSlotsPolicy


class LookaheadPolicy(LayerSlotsPolicy):
    """Scores the next layer with its router."""

    def __init__(self, routers: dict[int, RouterLogits], top_k: int, capacity: int,
                 num_experts: int) -> None:
        super().__init__(list(routers), top_k, capacity, num_experts)
        self._routers = routers

    def next_scores(self, layer: int, nxt: int, hidden: torch.Tensor) -> torch.Tensor:
        return self._routers[nxt](hidden)
