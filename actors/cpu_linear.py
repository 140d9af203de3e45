"""Linear layers with weights pre-packed for oneDNN on the CPU.

`F.linear` in bf16 re-lays its weight out on every call; packing once at load gives the same
results on the same CPU, within one unit in the last place where oneDNN picks other kernels for
the packed weight (AMX does for some shapes; tests/actors/test_cpu_linear.py compares a layer and a
whole engine, packed and not, wherever oneDNN can pack) in about two thirds of the time at batch 1,
where decode lives. Prepare once (`pack_linears`), run many times: the gpt-fast split.

Decode-sized calls (a few rows) on the model's projections go to Baton's own bf16 kernel
(`baton.kernels.cpu_decode`) where the CPU has one: oneDNN reads a weight far below the memory
bandwidth at one row. Those calls keep fp32 accumulation but not oneDNN's summation order, so a
layer's results on that path are the kernel's own, not `nn.Linear`'s bit for bit.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from baton.kernels import cpu_decode

log = logging.getLogger(__name__)


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    mkldnn = torch.ops.mkldnn
    if not hasattr(mkldnn, "_reorder_linear_weight") or not hasattr(mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(mkldnn._is_mkldnn_bf16_supported())
    return bool(mkldnn._is_mkldnn_fp16_supported())


class PackedLinear(nn.Module):
    """Drop-in for `nn.Linear` (inference only) holding a oneDNN-packed weight.

    Calls of up to `skinny_rows` rows run on the skinny kernel over a copy of the weight in its
    layout (default: what `cpu_decode.skinny_rows` gives this weight; 0: oneDNN only).
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 1, skinny_rows: int | None = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer(
            "packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint),
            persistent=False,
        )
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        self.weight_dtype = weight.dtype
        if skinny_rows is None:
            skinny_rows = cpu_decode.skinny_rows(weight)
        self.skinny_rows = skinny_rows
        skinny = cpu_decode.pack_skinny(weight) if skinny_rows else None
        self.register_buffer("skinny_weight", skinny, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The plain [out, in] weight (exact, unpacked anew on every read): for the code that
        reads a layer's weight rather than calling it (layer-skip calibration's LM head, the
        expert cache's next-layer router), not for the forward pass."""
        if self.skinny_weight is not None:
            return cpu_decode.unpack_skinny(self.skinny_weight, self.out_features)
        return self.packed_weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny_weight is not None and x.numel() <= self.skinny_rows * self.in_features:
            return cpu_decode.skinny_linear(x, self.skinny_weight, self.out_features, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` of `model` for a `PackedLinear`; returns how many were swapped."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    log.debug("packed %d linear layers for oneDNN", len(swaps))
    return len(swaps)
