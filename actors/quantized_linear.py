"""Linear layers with weight-only int8 or int4 weights, for a pool that trades accuracy for memory.

`quantize_linears(model, "int8" | "int4")` swaps every `nn.Linear` except the output head for a
`QuantizedLinear` (embeddings are not linears and stay as they are); the matmul runs through
`baton.kernels`: Triton on CUDA; on the CPU, Baton's skinny int8 and int4 kernels on bf16 models
where the CPU kernels run (`cpu_decode.takes_int8`, `cpu_decode.takes_int4`: weights laid out
once, here), else PyTorch's int8 matmul, and for int4 PyTorch's packed int4 matmul (weights
packed once, here) or dequantize-then-matmul, whichever measured faster for the layer's shape
(`baton.kernels.quantized_matmul_cpu`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from baton.engine_config import INT4_GROUP_SIZES, QUANTIZATIONS
from baton.errors import ConfigError
from baton.kernels import cpu_decode
from baton.kernels.quantized_matmul import (
    int4_matmul,
    int8_matmul,
    quantize_int4,
    quantize_int8,
)
from baton.kernels.quantized_matmul_cpu import (
    int4_packed_matmul,
    pack_int4,
    packed_int4_wins,
    packing_supported,
)

log = logging.getLogger(__name__)


class QuantizedLinear(nn.Module):
    """Drop-in for `nn.Linear` (inference only) holding int8 or int4 weights and their scales.

    A layer on the CPU holds either Baton's layout (`qweight`, `scales`, and for int4 `zeros`) or
    a kernel's packed one, never both; `packed` says which, and `skinny` whether the kernel is
    Baton's. Packed int8 is the skinny kernel's (`packed_weight`, float32 `scales`); packed int4
    the skinny kernel's (`packed_weight`, bf16 `scale_zeros`) or PyTorch's (`packed_weight`,
    `scale_zeros`). Build it on the device it will run on: packed layouts are the CPU's own.
    """

    def __init__(self, linear: nn.Linear, mode: str, group_size: int | None = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.mode = mode
        self.group_size = group_size if mode == "int4" else None
        weight = linear.weight.detach()
        zeros = packed = scale_zeros = None
        self.skinny = False
        if mode == "int8":
            qweight, scales = quantize_int8(weight)
            if cpu_decode.takes_int8(weight):
                packed, scales = cpu_decode.pack_skinny_int8(qweight), scales.float()
                qweight, self.skinny = None, True
        else:
            if group_size is None:
                raise ConfigError("int4 needs a group size (see int4_group_size)")
            qweight, scales, zeros = quantize_int4(weight, group_size)
            if cpu_decode.takes_int4(weight, group_size):
                packed, scale_zeros = cpu_decode.pack_skinny_int4(qweight, scales, zeros)
                qweight = scales = zeros = None
                self.skinny = True
            elif packing_supported(self.out_features, group_size, weight.device) and \
                    packed_int4_wins(self.out_features, self.in_features, group_size, weight.dtype):
                packed, scale_zeros = pack_int4(qweight, scales, zeros)
                qweight = scales = zeros = None
        self.packed = packed is not None
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scale_zeros", scale_zeros)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8":
            if self.packed:  # a bf16 model's layer (`takes_int8`): x is bf16
                return cpu_decode.skinny_linear_int8(x, self.packed_weight, self.scales,
                                                     self.out_features, self.bias)
            return int8_matmul(x, self.qweight, self.scales, self.bias)
        if self.skinny:  # a bf16 model's layer (`takes_int4`): x is bf16
            return cpu_decode.skinny_linear_int4(x, self.packed_weight, self.scale_zeros,
                                                 self.out_features, self.group_size, self.bias)
        if self.packed:
            return int4_packed_matmul(x, self.packed_weight, self.scale_zeros, self.group_size,
                                      self.bias)
        return int4_matmul(x, self.qweight, self.scales, self.zeros, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        kind = ", skinny" if self.skinny else ", packed" if self.packed else ""
        return f"{shape}, {self.mode}{group}{kind}"


def quantize_linears(model: nn.Module, mode: str, group_size: int | None = None) -> int:
    """Swap every `nn.Linear` but the output head for a `QuantizedLinear`; returns how many.

    int4 `group_size` None takes the largest of `INT4_GROUP_SIZES` that divides every swapped
    layer's input size; a given one must divide them all (`ConfigError` naming a layer it does
    not, and the sizes that would fit). Nothing is swapped unless every layer can be.
    """
    if mode not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {QUANTIZATIONS}, got {mode!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swaps = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child is not head:
                swaps.append((parent, name, child, f"{parent_name}.{name}".lstrip(".")))
    if mode == "int4":
        group_size = int4_group_size({path: c.in_features for _, _, c, path in swaps}, group_size)
    for parent, name, child, _ in swaps:
        setattr(parent, name, QuantizedLinear(child, mode, group_size))
    packed = sum(getattr(parent, name).packed for parent, name, _, _ in swaps)
    log.info("quantized %d linear layers to %s%s, %d packed for the CPU", len(swaps), mode,
             f" in groups of {group_size}" if mode == "int4" else "", packed)
    return len(swaps)


def int4_group_size(in_features: dict[str, int], requested: int | None) -> int:
    """The int4 group size for layers of these input sizes (by module path): `requested` if it
    divides every one, else a `ConfigError`; None picks the largest size that does."""
    fitting = [g for g in sorted(INT4_GROUP_SIZES, reverse=True)
               if all(k % g == 0 for k in in_features.values())]
    if requested is not None and requested not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {requested}")
    wanted = [requested] if requested is not None else list(INT4_GROUP_SIZES)
    for path, k in in_features.items():
        if not any(k % g == 0 for g in wanted):
            groups = f"groups of {requested}" if requested is not None else \
                f"any group size of {INT4_GROUP_SIZES}"
            fix = (f"the group sizes that fit every layer are {fitting}; set one, or leave "
                   f"quant_group_size unset to get the largest" if fitting
                   else "no int4 group size fits every layer; use int8")
            raise ConfigError(f"cannot quantize {path} to int4 in {groups}: its input size {k} "
                              f"is not a multiple; {fix}")
    return requested if requested is not None else fitting[0]
