"""RMSNorm layers of Llama-family models on Baton's CPU kernel (bf16, where it is built).

transformers' RMSNorm is eight small ops (upcast, square, mean, add, rsqrt, scale, downcast,
weight), run twice a layer: at batch 1 their dispatch costs more than their math. The kernel does
the same arithmetic in one call (`baton.kernels.cpu_decode.rms_norm`: statistics in fp32, the
normalized row rounded to bf16 before the weight). Only classes whose forward is exactly that
formula are swapped; others (Gemma's `1 + weight`, for one) keep their own.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from baton.kernels import cpu_decode

log = logging.getLogger(__name__)

# transformers classes whose forward is Llama's: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)
LLAMA_RMSNORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                            "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "MixtralRMSNorm"})


class KernelRMSNorm(nn.Module):
    """Drop-in for one of `LLAMA_RMSNORMS` (inference only), on the CPU kernel."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return cpu_decode.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, kernel"


def use_kernel_norms(model: nn.Module) -> int:
    """Swap the bf16 CPU RMSNorms of `model` the kernel computes for `KernelRMSNorm`; returns how
    many were swapped (none where the kernel is not built)."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (type(child).__name__ in LLAMA_RMSNORMS
                    and child.weight.dtype == torch.bfloat16
                    and child.weight.device.type == "cpu"):
                swaps.append((parent, name, child))
    if not swaps or cpu_decode.kernel() is None:
        return 0
    for parent, name, child in swaps:
        setattr(parent, name, KernelRMSNorm(child))
    log.debug("%d RMSNorm layers on the CPU kernel", len(swaps))
    return len(swaps)
