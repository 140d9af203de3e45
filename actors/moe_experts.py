"""Baton's grouped-GEMM MoE as a transformers experts implementation ("baton_grouped").

transformers 5 keeps a MoE layer's experts as fused 3-D tensors (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`) behind an experts interface; registering `experts_forward` there lets
`model.set_experts_implementation("baton_grouped")` route every MoE layer through
`baton.kernels.moe`. The engine does so where the kernel runs (CUDA); on the CPU transformers'
own grouped path stays.
"""

from __future__ import annotations

import logging

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from baton.errors import ModelLoadError
from baton.kernels.dispatch import backend
from baton.kernels.moe import moe_experts

log = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "baton_grouped"


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward: `hidden_states [S, H]`, top-k index and weights `[S, k]`."""
    if getattr(self, "has_bias", False) or getattr(self, "is_transposed", False) or \
            not getattr(self, "is_concatenated", True) or not getattr(self, "has_gate", True):
        raise ModelLoadError(
            f"{type(self).__name__} stores its experts in a layout Baton's grouped MoE does not "
            "take (needs gate_up_proj [E, 2I, H] and down_proj [E, H, I], no bias)")
    return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj,
                       self.down_proj, self._apply_gate)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)


def use_grouped_experts(model, device: torch.device) -> bool:
    """Route `model`'s MoE layers through Baton's grouped GEMM where the kernel runs here."""
    if backend(device) != "triton" or not getattr(model, "_can_set_experts_implementation",
                                                  lambda: False)():
        return False
    if not any(isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
               for m in model.modules()):  # none, or offloaded (the offload forward runs them)
        return False
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    log.info("MoE layers run Baton's grouped GEMM")
    return True
