"""Linear layers with weight-only int8 or int4 weights, for a pool that trades accuracy for memory.

`quantize_linears(model, "int8" | "int4")` swaps every `nn.Linear` except the output head for a
`QuantizedLinear` (embeddings are not linears and stay as they are); the matmul runs through
`baton.kernels.quantized_matmul`: Triton on CUDA, PyTorch's packed int8 matmul (int8) or the
dequantizing reference (int4) on the CPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from baton.engine_config import INT4_GROUP_SIZES, QUANTIZATIONS
from baton.errors import ConfigError
from baton.kernels.quantized_matmul import (
    int4_matmul,
    int8_matmul,
    quantize_int4,
    quantize_int8,
)

log = logging.getLogger(__name__)


class QuantizedLinear(nn.Module):
    """Drop-in for `nn.Linear` (inference only) holding int8 or int4 weights and their scales."""

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = 128):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.mode = mode
        weight = linear.weight.detach()
        if mode == "int8":
            qweight, scales = quantize_int8(weight)
            zeros = None
        else:
            qweight, scales, zeros = quantize_int4(weight, group_size)
        self.group_size = group_size if mode == "int4" else None
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8":
            return int8_matmul(x, self.qweight, self.scales, self.bias)
        return int4_matmul(x, self.qweight, self.scales, self.zeros, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, {self.mode}{group}"


def quantize_linears(model: nn.Module, mode: str, group_size: int = 128) -> int:
    """Swap every `nn.Linear` but the output head for a `QuantizedLinear`; returns how many."""
    if mode not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {QUANTIZATIONS}, got {mode!r}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swaps = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child is not head:
                swaps.append((parent, name, child, f"{parent_name}.{name}".lstrip(".")))
    for parent, name, child, path in swaps:
        try:
            setattr(parent, name, QuantizedLinear(child, mode, group_size))
        except ConfigError as exc:
            raise ConfigError(f"cannot quantize {path} to {mode}: {exc.message}") from exc
    log.info("quantized %d linear layers to %s", len(swaps), mode)
    return len(swaps)
