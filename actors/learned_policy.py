"""Learned routing-path prefetch (ExpertFlow): at the first MoE layer a trained predictor names
every later layer's experts for the step's tokens; each layer then prefetches the next ones."""

from __future__ import annotations

import torch

from baton.actors.expert_policies import ExpertKey, PredictiveLRU, most_voted
from baton.actors.routing_predictor import RoutingPredictor

DEPTH = 2  # MoE layers ahead to prefetch


class LearnedPolicy(PredictiveLRU):
    """LRU eviction sparing predicted experts; prefetches the predictor's path for this step.

    The path is predicted once per step, from the first MoE layer's input; every layer prefetches
    the next `depth` layers of it (most voted experts first), within the free slots."""

    def __init__(self, predictor: RoutingPredictor, capacity: int, depth: int = DEPTH) -> None:
        super().__init__(capacity)
        self.predictor = predictor
        self._source = predictor.shape.moe_layers[0]
        self._targets = list(predictor.shape.targets)
        self._depth = depth
        self._path: list[list[ExpertKey]] = []  # per target layer, most voted first

    def predict(self, layer: int, hidden: torch.Tensor) -> list[ExpertKey]:
        if layer == self._source:
            self._path = self._predict_path(hidden)
        ahead = [i for i, target in enumerate(self._targets) if target > layer][: self._depth]
        keys = [key for i in ahead if i < len(self._path) for key in self._path[i]]
        return self._bounded(keys)

    def _predict_path(self, hidden: torch.Tensor) -> list[list[ExpertKey]]:
        with torch.no_grad():
            top = self.predictor.top_k(hidden).cpu()  # [T, targets, k]
        num_experts = self.predictor.shape.num_experts
        return [[(target, e) for e in most_voted(top[:, i], num_experts)]
                for i, target in enumerate(self._targets)]
