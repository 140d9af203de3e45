"""int4 weight-only matmul on the CPU: PyTorch's packed int4 kernel where it measures faster.

bf16 layers on a CPU with Baton's kernels run `cpu_decode.skinny_linear_int4` instead (faster at
every batch size measured there); this module serves the others (float32 models, CPUs without
avx512_bf16).

`torch.ops.aten._weight_int4pack_mm_for_cpu` reads a weight packed once
(`_convert_weight_to_int4pack_for_cpu`, a layout of its own that depends on the CPU) with each
group's scale and zero in one `[K // group, N, 2]` tensor, and computes `w = (q - 8) * scale +
zero`: the formula of Baton's int4 layout, so packing changes no weight value. It unpacks in
registers, so a decode step reads only the packed bytes; dequantize-then-matmul writes and reads
a float32 copy of the whole weight on every call.

Which is faster depends on the CPU, the dtype and the shape (measured on an AVX2 EPYC: packed is
1.5-70x faster in bfloat16 at 1 to 16 rows, but its float32 path is 2-25x slower than
dequantize-then-matmul), so `packed_int4_wins` times both once per weight shape, dtype and thread
count, at decode batch sizes, and the layer keeps only the layout that won.
`_dyn_quant_matmul_4bit` is no candidate: off ARM it falls back to a scalar loop (10x slower than
the packed kernel at batch 1 here), takes float32 input only and rounds activations to int8.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from typing import Literal

import torch

from baton.engine_config import INT4_GROUP_SIZES
from baton.kernels.quantized_matmul import int4_matmul_reference, quantize_int4

log = logging.getLogger(__name__)

Int4CpuPath = Literal["packed", "dequantize"]
PACK_N_MULTIPLE = 16  # the packed kernel's layout takes whole tiles of 16 output channels
DECODE_ROWS = (1, 16)  # batch sizes the choice is timed at: decode is where int4 pays
TIMED_RUNS = 5
_forced: Int4CpuPath | None = None


def packing_supported(out_features: int, group_size: int, device: torch.device) -> bool:
    """Whether the packed kernel takes a `[out_features, K]` int4 weight on `device`."""
    ops = torch.ops.aten
    return (device.type == "cpu" and out_features % PACK_N_MULTIPLE == 0
            and group_size in INT4_GROUP_SIZES
            and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
            and hasattr(ops, "_weight_int4pack_mm_for_cpu"))


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(packed weight, scale_zeros [K // group, N, 2])` for the packed kernel, from Baton's int4
    layout (`baton.kernels.quantized_matmul`); `scale_zeros` keeps the scales' dtype."""
    n = qweight.shape[0]
    q = torch.stack((qweight & 15, qweight >> 4), dim=2).view(n, -1).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scale_zeros = torch.stack((scales.T, zeros.T), dim=2).contiguous()
    return packed, scale_zeros


def int4_packed_matmul(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T (+ bias)` for a weight from `pack_int4`, in `x`'s dtype; `x` is `[..., K]`."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group_size,
                                                     scale_zeros.to(x.dtype))
    out = out.view(*x.shape[:-1], -1)
    return out if bias is None else out + bias


@contextlib.contextmanager
def force_int4_cpu_path(path: Int4CpuPath) -> Iterator[None]:
    """Layers quantized inside use `path` wherever packing is supported, untimed (tests)."""
    global _forced
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


def packed_int4_wins(out_features: int, in_features: int, group_size: int,
                     dtype: torch.dtype) -> bool:
    """Whether the packed kernel beats dequantize-then-matmul on this CPU for such a weight.

    Timed once per shape, group, dtype and thread count (a few milliseconds each), on random
    weights at `DECODE_ROWS` rows; `force_int4_cpu_path` skips the timing.
    """
    if _forced is not None:
        return _forced == "packed"
    return _packed_is_faster(out_features, in_features, group_size, dtype,
                             torch.get_num_threads())


@functools.cache
def _packed_is_faster(n: int, k: int, group_size: int, dtype: torch.dtype, threads: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=gen).to(dtype), group_size)
    packed, scale_zeros = pack_int4(qweight, scales, zeros)
    packed_s = dequant_s = 0.0
    for rows in DECODE_ROWS:
        x = torch.randn(rows, k, generator=gen).to(dtype)
        packed_s += _best_time(lambda x=x: int4_packed_matmul(x, packed, scale_zeros, group_size))
        dequant_s += _best_time(lambda x=x: int4_matmul_reference(x, qweight, scales, zeros))
    log.debug("int4 [%d, %d] group %d %s, %d threads: packed %.0f us, dequantize %.0f us "
              "(sum over %s rows)", n, k, group_size, dtype, threads, packed_s * 1e6,
              dequant_s * 1e6, DECODE_ROWS)
    return packed_s < dequant_s


def _best_time(fn) -> float:
    fn()  # first call pays for allocation
    best = float("inf")
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
