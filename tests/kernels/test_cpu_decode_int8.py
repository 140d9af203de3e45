"""Baton's skinny int8 kernel: weight-only int8 layers of bf16 models on the CPU. Exact sums
rounded once, its layout, and the quantized layers that use it.

Skipped on CPUs without avx512_bf16 and with the kernels off (PyTorch's int8 matmul runs there).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baton.actors.quantized_linear import QuantizedLinear
from baton.kernels import cpu_decode
from baton.kernels.quantized_matmul import int8_matmul_reference, quantize_int8

pytestmark = pytest.mark.skipif(not cpu_decode.wanted(),
                                reason="no avx512_bf16 here, or BATON_CPU_KERNELS=0")


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 17, 32, 33, 64])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (5, 128), (193, 576), (576, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_int8_is_the_exact_sum_scaled_and_rounded_to_bf16(rows, n, k, with_bias):
    torch.manual_seed(rows * 1000 + n)
    x = torch.randn(1, rows, k).to(torch.bfloat16)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n) * 0.01 + 1e-3
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    y = cpu_decode.skinny_linear_int8(x, cpu_decode.pack_skinny_int8(q), scales, n, bias)
    assert y.shape == (1, rows, n) and y.dtype == torch.bfloat16
    exact = (x.double() @ q.double().T) * scales.double()
    if bias is not None:
        exact = exact + bias.double()
    step = exact.abs() * 2.0**-7 + 1e-5  # one bf16 ulp of the exact value, at most
    assert ((y.double() - exact).abs() <= step).all()


def test_an_int8_rows_result_does_not_depend_on_the_rows_beside_it():
    """Any number of rows (on AMX, 32 at a time) gives each row the bits it gets alone: a
    prompt chunk, a verify step and a decode row agree."""
    torch.manual_seed(4)
    q = torch.randint(-127, 128, (200, 576), dtype=torch.int8)
    scales = torch.rand(200) * 0.01 + 1e-3
    packed, bias = cpu_decode.pack_skinny_int8(q), torch.randn(200).to(torch.bfloat16)
    x = torch.randn(40, 576).to(torch.bfloat16)
    alone = torch.cat([cpu_decode.skinny_linear_int8(row[None], packed, scales, 200, bias)
                       for row in x])
    for rows in (2, 17, 32, 33, 40):
        assert torch.equal(cpu_decode.skinny_linear_int8(x[:rows], packed, scales, 200, bias),
                           alone[:rows])


def test_the_int8_layout_round_trips_and_refuses_what_it_cannot_take():
    q = torch.randint(-127, 128, (6, 128), dtype=torch.int8)
    packed = cpu_decode.pack_skinny_int8(q)
    assert packed.shape == (2, 2, 4, 64)  # rows padded to whole blocks of four
    assert torch.equal(cpu_decode.unpack_skinny(packed, 6), q)
    with pytest.raises(ValueError, match="multiple of 64, got 96"):
        cpu_decode.pack_skinny_int8(q[:, :96])
    x = torch.randn(1, 128).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="one scale per output row"):
        cpu_decode.skinny_linear_int8(x, packed, torch.ones(5), 6)


def test_int8_layers_of_bf16_models_keep_only_the_kernels_layout():
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=True).to(torch.bfloat16)
    layer = QuantizedLinear(linear, "int8")
    assert layer.packed and layer.qweight is None and layer.scales.dtype == torch.float32
    q, scales = quantize_int8(linear.weight.detach())
    with torch.inference_mode():
        for rows in (1, 7, 40):
            x = torch.randn(rows, 576).to(torch.bfloat16)
            ref = int8_matmul_reference(x.float(), q, scales.float(), linear.bias.detach().float())
            torch.testing.assert_close(layer(x).float(), ref, rtol=2**-7, atol=1e-3)
    # float32 models, and input sizes that are no multiple of 64, keep PyTorch's int8 matmul.
    assert not QuantizedLinear(nn.Linear(576, 64), "int8").packed
    assert not QuantizedLinear(nn.Linear(96, 64).to(torch.bfloat16), "int8").packed
