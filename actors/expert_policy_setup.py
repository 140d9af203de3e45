"""Building the expert cache's policy from `moe_offload.policy` and what the model offers it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.actors.expert_policies import (
    ExpertPolicy,
    LFUPolicy,
    LRUPolicy,
    RouterLogits,
)
from baton.actors.learned_policy import LearnedPolicy
from baton.actors.lookahead_policy import LookaheadPolicy
from baton.actors.pregate import Pregate
from baton.actors.pregate_policy import PregatePolicy
from baton.actors.routing_predictor import ModelShape, RoutingPredictor
from baton.actors.trace_policy import TracePolicy
from baton.engine_config import MOE_POLICIES, MoEOffloadConfig
from baton.errors import ConfigError


@dataclass(slots=True)
class PolicyInputs:
    """What predictive policies draw on: each MoE layer's router, the model's MoE shape, the
    cache's slot count, the device the MoE inputs live on and the model's pre-gate (if it is
    routed by one)."""

    routers: dict[int, RouterLogits]
    shape: ModelShape
    capacity: int
    device: torch.device
    model: str = "the model"
    pregate: Pregate | None = None


def make_policy(config: MoEOffloadConfig, inputs: PolicyInputs) -> ExpertPolicy:
    """The policy `config.policy` names; `ConfigError` for an unknown name or a predictor file
    that does not fit the model."""
    name = config.policy
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "lookahead":
        return LookaheadPolicy(inputs.routers, inputs.shape.top_k, inputs.capacity,
                               inputs.shape.num_experts)
    if name == "trace":
        return TracePolicy(list(inputs.shape.moe_layers), inputs.shape.num_experts,
                           inputs.shape.top_k, inputs.capacity)
    if name == "pregate":
        if inputs.pregate is None:
            raise ConfigError(
                f"moe_offload.policy 'pregate' needs a model routed by one router for all layers; "
                f"{inputs.model} has a router per layer: make one with `baton moefy --pregate`, "
                "or choose another policy")
        return PregatePolicy(inputs.pregate, list(inputs.shape.moe_layers), inputs.capacity)
    if name == "learned":
        if config.predictor is None:  # the config model refuses this; stay total anyway
            raise ConfigError("moe_offload.predictor is required with policy 'learned'")
        predictor = RoutingPredictor.load(config.predictor, inputs.shape, inputs.model)
        return LearnedPolicy(predictor.to(inputs.device), inputs.capacity)
    raise ConfigError(f"moe_offload.policy must be one of {list(MOE_POLICIES)}, got {name!r}")
