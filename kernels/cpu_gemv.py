"""Baton's skinny bf16 matmul for CPU decode steps (`cpu_gemv.cpp`), built once per machine.

oneDNN runs a bf16 linear at one token a row much slower than the weight can be read. This C++
kernel (AVX-512 BF16 dot products, rows split over torch's threads) does the decode-sized calls
instead. Measured on an AMD EPYC with avx512_bf16, 2 threads, weights hot in cache (us per call,
oneDNN packed -> this kernel):

| weight [N, K] | 1 row | 4 rows | 8 rows | 17 rows |
| --- | --- | --- | --- | --- |
| 192 x 576 (k/v) | 38 -> 5 | 33 -> 8 | 29 -> 12 | 45 -> 33 |
| 576 x 576 (q/o) | 44 -> 18 | 30 -> 19 | 40 -> 26 | 63 -> 80 |
| 576 x 1536 (down) | 42 -> 24 | 45 -> 31 | 87 -> 61 | 126 -> 188 |
| 3072 x 576 (gate+up) | 67 -> 70 | 71 -> 72 | 104 -> 127 | 194 -> 345 |
| 49152 x 576 (LM head) | 3083 -> 3281 | 2779 -> 4600 | 3402 -> 3865 | 4366 -> 6750 |

So it takes calls of up to `MAX_ROWS` rows on weights of up to `MAX_WEIGHT_ELEMENTS`, and
oneDNN keeps the rest (prompt chunks, long verify runs, the LM head).

It is compiled with the machine's C++ compiler through `torch.utils.cpp_extension` (about 30 s,
once; cached under `TORCH_EXTENSIONS_DIR`). It is used only where the CPU has avx512_bf16, and
`BATON_CPU_GEMV=0` turns it off. Where it cannot be built, oneDNN runs everything (logged once).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gemv.cpp")
MAX_ROWS = 8
MAX_WEIGHT_ELEMENTS = 1 << 21  # 4 MiB of bf16: every projection of a small model, no LM head


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def kernel() -> ModuleType | None:
    """The built extension, or None where it is off, unsupported or fails to build."""
    if os.environ.get("BATON_CPU_GEMV", "1") == "0":
        return None
    if "avx512_bf16" not in cpu_flags():
        log.info("no avx512_bf16 on this CPU: decode linears stay on oneDNN")
        return None
    from torch.utils.cpp_extension import load

    try:
        return load("baton_cpu_gemv", [str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a compiler without avx512bf16 ...
        log.warning("cannot build Baton's CPU decode kernel (%s); oneDNN runs every linear",
                    exc)
        return None


def fits(weight: torch.Tensor) -> bool:
    """Whether decode-sized calls on `weight [N, K]` go to this kernel (see the table above)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and weight.shape[1] % 32 == 0
            and weight.numel() <= MAX_WEIGHT_ELEMENTS and kernel() is not None)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for bf16 `x [..., K]` with few rows, fp32 accumulation."""
    ext = kernel()
    if ext is None:
        raise RuntimeError("Baton's CPU decode kernel is not available on this machine")
    return ext.skinny_linear(x, weight.contiguous(), bias)
