"""int4 on the CPU through PyTorch's packed kernel: the same product as Baton's dequantizing
reference, from weights packed once."""

from __future__ import annotations

import pytest
import torch

from baton.kernels.quantized_matmul import int4_matmul_reference, quantize_int4
from baton.kernels.quantized_matmul_cpu import int4_packed_matmul, pack_int4
from tests.kernels.conftest import assert_close


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("m", "n", "k", "group_size", "bias"), [
    (1, 576, 576, 64, False),  # a decode step of the default model's attention
    (5, 48, 192, 32, True),
    (33, 32, 256, 128, False),
])
def test_packed_product_is_the_dequantized_product_in_float32(m, n, k, group_size, bias):
    """float32: the packed kernel and dequantize-then-matmul agree to float rounding."""
    q, scales, zeros = quantize_int4(_rand(n, k), group_size)
    x = _rand(2, m, k, seed=1) * k ** -0.5  # leading batch axes are kept
    b = _rand(n, seed=2) if bias else None
    out = int4_packed_matmul(x, *pack_int4(q, scales, zeros), group_size, b)
    assert out.shape == (2, m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, int4_matmul_reference(x, q, scales, zeros, b),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_product_matches_the_reference_in_half_precision(dtype):
    q, scales, zeros = quantize_int4(_rand(192, 576).to(dtype), 64)
    x = (_rand(16, 576, seed=1) * 576 ** -0.5).to(dtype)
    out = int4_packed_matmul(x, *pack_int4(q, scales, zeros), 64)
    assert out.dtype == dtype
    assert_close(out, int4_matmul_reference(x, q, scales, zeros), dtype)
