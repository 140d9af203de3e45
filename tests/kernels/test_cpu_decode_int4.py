"""Baton's skinny int4 kernel: weight-only int4 layers of bf16 models on the CPU. Exact sums
rounded once, its layout, and the quantized layers that use it.

Skipped on CPUs without avx512_bf16 and with the kernels off (PyTorch's int4 matmul runs there).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baton.actors.quantized_linear import QuantizedLinear
from baton.kernels import cpu_decode
from baton.kernels.quantized_matmul import dequantize_int4, quantize_int4

pytestmark = pytest.mark.skipif(not cpu_decode.wanted(),
                                reason="no avx512_bf16 here, or BATON_CPU_KERNELS=0")


def _int4(n: int, k: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
    return quantize_int4(weight, group)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 64])
@pytest.mark.parametrize(("n", "k", "group"), [(1, 64, 32), (5, 128, 64), (193, 576, 64),
                                               (576, 1536, 64), (40, 256, 128), (96, 576, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_int4_is_the_exact_sum_rounded_to_bf16(rows, n, k, group, with_bias):
    qweight, scales, zeros = _int4(n, k, group, seed=rows * 1000 + n)
    torch.manual_seed(rows)
    x = torch.randn(1, rows, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    packed, scale_zeros = cpu_decode.pack_skinny_int4(qweight, scales, zeros)
    y = cpu_decode.skinny_linear_int4(x, packed, scale_zeros, n, group, bias)
    assert y.shape == (1, rows, n) and y.dtype == torch.bfloat16
    exact = x.double() @ dequantize_int4(qweight, scales, zeros).double().T
    if bias is not None:
        exact = exact + bias.double()
    # One bf16 step of the exact value, plus what fp32 loses to the offset of 128 the kernel
    # adds to every weight and takes off again per group.
    step = exact.abs() * 2.0**-7 + 1e-4
    assert ((y.double() - exact).abs() <= step).all()


def test_the_int4_layout_holds_blocks_of_16_rows_and_refuses_what_it_cannot_take():
    qweight, scales, zeros = _int4(20, 128, 64, seed=0)
    packed, scale_zeros = cpu_decode.pack_skinny_int4(qweight, scales, zeros)
    assert packed.shape == (2, 16, 64) and packed.dtype == torch.uint8  # 20 rows -> 2 blocks
    assert scale_zeros.shape == (2, 2, 2, 16) and scale_zeros.dtype == torch.bfloat16
    assert scale_zeros[1, :, :, 4:].eq(0).all()  # rows past N carry nothing
    # Rows are independent: each output row is the one a single-row weight gives.
    x = torch.randn(3, 128).to(torch.bfloat16)
    y = cpu_decode.skinny_linear_int4(x, packed, scale_zeros, 20, 64)
    one, one_sz = cpu_decode.pack_skinny_int4(qweight[17:18], scales[17:18], zeros[17:18])
    assert torch.equal(y[:, 17:18], cpu_decode.skinny_linear_int4(x, one, one_sz, 1, 64))
    with pytest.raises(ValueError, match="multiple of 64, got 96"):
        cpu_decode.pack_skinny_int4(qweight[:, :48], scales[:, :1], zeros[:, :1])
    with pytest.raises(RuntimeError, match=r"scales and zeros laid out"):
        cpu_decode.skinny_linear_int4(x, packed, scale_zeros, 20, 32)  # packed for groups of 64
    with pytest.raises(RuntimeError, match="int4 groups of 32, 64 or 128, not 48"):
        cpu_decode.skinny_linear_int4(x, packed, scale_zeros, 20, 48)
    with pytest.raises(RuntimeError, match="cannot have 40 rows"):
        cpu_decode.skinny_linear_int4(x, packed, scale_zeros, 40, 64)


def test_int4_layers_of_bf16_models_keep_only_the_kernels_layout():
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=True).to(torch.bfloat16)
    layer = QuantizedLinear(linear, "int4", 64)
    assert layer.skinny and layer.packed and layer.qweight is None and layer.zeros is None
    assert "skinny" in repr(layer)
    qweight, scales, zeros = quantize_int4(linear.weight.detach(), 64)
    weight = dequantize_int4(qweight, scales, zeros)
    with torch.inference_mode():
        for rows in (1, 7, 40):
            x = torch.randn(rows, 576).to(torch.bfloat16)
            ref = x.float() @ weight.T + linear.bias.detach().float()
            torch.testing.assert_close(layer(x).float(), ref, rtol=2**-7, atol=2e-3)
    # float32 models, and input sizes that are no multiple of 64, keep PyTorch's int4 paths.
    assert not QuantizedLinear(nn.Linear(576, 64), "int4", 64).skinny
    assert not QuantizedLinear(nn.Linear(96, 64).to(torch.bfloat16), "int4", 32).skinny
