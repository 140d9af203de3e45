"""Weight-only quantized matmul: int8 per output channel, int4 in groups of 32, 64 or 128.

Prepare once (`quantize_int8`, `quantize_int4`), run many times (`int8_matmul`, `int4_matmul`):
activations stay in the model's dtype and weights are dequantized inside the kernel, so a decode
step reads a quarter (int8: half) of the weight bytes. Layouts:

- int8: `qweight [N, K]` int8, `scales [N]`; `w = qweight * scales[:, None]` (symmetric).
- int4: `qweight [N, K // 2]` uint8, two values a byte (low nibble first along K), unsigned
  0..15; `scales, zeros [N, K // group]`; `w = (q - 8) * scale + zero` (asymmetric per group).
"""

from __future__ import annotations

import torch

from baton.engine_config import INT4_GROUP_SIZES
from baton.errors import ConfigError
from baton.kernels.dispatch import backend


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(qweight int8 [N, K], scales [N])` for a `[N, K]` weight; scales keep its dtype."""
    _check_weight(weight)
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    qweight = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return qweight, scales.to(weight.dtype)


def quantize_int4(weight: torch.Tensor, group_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(qweight uint8 [N, K // 2], scales, zeros [N, K // group_size])` for a `[N, K]` weight."""
    _check_weight(weight)
    _check_group(weight.shape[1], group_size)
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    zeros = lo + 8 * scales
    q = ((w - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).view(n, k)
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return qweight, scales.to(weight.dtype), zeros.to(weight.dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                    ) -> torch.Tensor:
    """The float32 `[N, K]` weight an int4 layout stands for."""
    n = qweight.shape[0]
    groups = scales.shape[1]
    q = torch.stack((qweight & 15, qweight >> 4), dim=2).view(n, groups, -1).float()
    return ((q - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(n, -1)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T (+ bias)` for an int8 weight, in `x`'s dtype; `x` is `[..., K]`."""
    _check_input(x, qweight.shape[1])
    if backend(x.device) == "triton":
        from baton.kernels.quantized_matmul_triton import quantized_matmul_triton

        return quantized_matmul_triton(x, qweight, scales, None, bias, group_size=0)
    if x.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
        # PyTorch's own CPU kernel for exactly this layout (x and scales of one dtype).
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch._weight_int8pack_mm(flat, qweight, scales.to(x.dtype))
        out = out.view(*x.shape[:-1], -1)
        return out if bias is None else out + bias
    return int8_matmul_reference(x, qweight, scales, bias)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T (+ bias)` for an int4 weight, in `x`'s dtype; `x` is `[..., K]`."""
    _check_input(x, qweight.shape[1] * 2)
    if backend(x.device) == "triton":
        from baton.kernels.quantized_matmul_triton import quantized_matmul_triton

        group_size = qweight.shape[1] * 2 // scales.shape[1]
        return quantized_matmul_triton(x, qweight, scales, zeros, bias, group_size)
    return int4_matmul_reference(x, qweight, scales, zeros, bias)


def int8_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    out = (x.float() @ qweight.float().T) * scales.float()
    return _finish(out, x, bias)


def int4_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ dequantize_int4(qweight, scales, zeros).T
    return _finish(out, x, bias)


def _finish(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ConfigError(f"quantize takes a float [out_features, in_features] weight, got "
                          f"{weight.dtype} {tuple(weight.shape)}")


def _check_group(in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ConfigError(f"in_features {in_features} is not a multiple of the int4 group size "
                          f"{group_size}; choose a group size that divides it")


def _check_input(x: torch.Tensor, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise ConfigError(f"input has {x.shape[-1]} features, the quantized weight takes "
                          f"{in_features}")
