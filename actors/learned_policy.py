"""Learned routing prefetch (ExpertFlow, a step at a time): a predictor trained by `baton
train-experts` on recorded routing scores the next MoE layer's experts from this layer's MoE
input (see `routing_predictor`). Eviction and prefetch are `LayerSlotsPolicy`'s."""

from __future__ import annotations

import torch

from baton.actors.layer_slots import LayerSlotsPolicy
from baton.actors.routing_predictor import RoutingPredictor


class LearnedPolicy(LayerSlotsPolicy):
    """Scores the next layer with the trained predictor's map for it."""

    def __init__(self, predictor: RoutingPredictor, capacity: int) -> None:
        shape = predictor.shape
        super().__init__(list(shape.moe_layers), shape.top_k, capacity, shape.num_experts)
        self.predictor = predictor

    def next_scores(self, layer: int, nxt: int, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.predictor.next_scores(layer, hidden)
