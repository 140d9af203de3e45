"""The decoder layer's elementwise ops on the CPU kernels (baton_kernels/cpu_layer.cpp): SiLU
times up and the residual add give ATen's bits, so a fused layer's tokens stay transformers' own;
the rotary call reads q and k in place from the stacked projection. Skipped where the kernels are
not built (no avx512_bf16, or BATON_CPU_KERNELS=0)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from baton.kernels import cpu_decode

pytestmark = pytest.mark.skipif(not cpu_decode.wanted(),
                                reason="no avx512_bf16 here, or BATON_CPU_KERNELS=0")


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16)


@pytest.mark.parametrize("inter", [64, 1536, 96])  # 96: not in steps of 64, ATen's own calls
@pytest.mark.parametrize("rows", [1, 2, 9, 16, 21, 22, 32])  # past 21 x 1536: ATen's grain
def test_silu_mul_is_atens_silu_then_mul_bit_for_bit(rows, inter):
    ext = cpu_decode.kernel()
    gen = torch.Generator().manual_seed(rows * inter)
    for scale in (0.5, 4.0, 30.0):
        gate_up = (torch.randn(rows, 2 * inter, generator=gen) * scale).to(torch.bfloat16)
        want = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        assert torch.equal(_bits(ext.silu_mul(gate_up)), _bits(want)), scale


@pytest.mark.parametrize("shape", [(1, 576), (9, 576), (17, 7), (32, 100)])
def test_add_bf16_is_atens_add_bit_for_bit(shape):
    ext = cpu_decode.kernel()
    gen = torch.Generator().manual_seed(shape[0])
    for scale in (1.0, 1e3, 1e-30):
        a = (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)
        b = (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)
        a[0, 0], b[0, 0] = float("inf"), 1.0
        assert torch.equal(_bits(ext.add_bf16(a, b)), _bits(a + b)), scale
    # Not two contiguous tensors of one shape: ATen's add.
    a = torch.randn(4, 8).to(torch.bfloat16)
    assert torch.equal(ext.add_bf16(a[:, :4], a[:, 4:]), a[:, :4] + a[:, 4:])


@pytest.mark.parametrize("rows", [1, 9])
def test_rope_reads_q_in_place_from_the_stacked_projection(rows):
    ext = cpu_decode.kernel()
    gen = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, 9 * 64 + 2 * 3 * 64, generator=gen).to(torch.bfloat16)
    q = qkv[:, : 9 * 64].view(rows, 9, 64)  # rows 960 apart
    cos = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    sin = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    assert torch.equal(ext.rope(q, cos, sin), ext.rope(q.contiguous(), cos, sin))
