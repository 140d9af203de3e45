"""Baton's skinny bf16 CPU matmul: exact sums rounded once, the shapes it takes and refuses, and
the packed linear layers that hand it their decode-sized calls.

Skipped on CPUs without avx512_bf16 (where oneDNN runs every linear) and with the kernel off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baton.actors.cpu_linear import PackedLinear, packing_supported
from baton.kernels import cpu_gemv

pytestmark = pytest.mark.skipif(cpu_gemv.kernel() is None,
                                reason="no avx512_bf16 here, or BATON_CPU_GEMV=0")


def bf16_exact(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The product of the bf16 values in float64: what fp32 accumulation approximates."""
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (5, 64), (193, 576), (576, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_is_the_exact_sum_rounded_to_bf16(rows, n, k, with_bias):
    """Every output within one bf16 step of the exact sum (fp32 accumulation errors are far
    below it), for row counts across the kernel's 4-row blocks and weights with ragged tails."""
    torch.manual_seed(rows * 1000 + n)
    x = torch.randn(1, rows, k).to(torch.bfloat16)
    w = torch.randn(n, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    y = cpu_gemv.skinny_linear(x, w, bias)
    assert y.shape == (1, rows, n) and y.dtype == torch.bfloat16
    exact = bf16_exact(x, w, bias)
    step = exact.abs() * 2.0**-7 + 1e-6  # one bf16 ulp of the exact value, at most
    assert ((y.double() - exact).abs() <= step).all()
    # Against the same math in float32 (what F.linear computes before it rounds), mostly equal.
    ref = nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
    assert (y == ref.to(torch.bfloat16)).float().mean() > 0.95


def test_a_width_that_is_not_a_multiple_of_32_is_refused_and_left_to_onednn():
    w = torch.randn(8, 48).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 32, got 48"):
        cpu_gemv.skinny_linear(torch.randn(1, 48).to(torch.bfloat16), w)
    assert not cpu_gemv.fits(w)
    assert not cpu_gemv.fits(torch.randn(8, 64))  # float32: oneDNN's
    assert not cpu_gemv.fits(torch.randn(49152, 576).to(torch.bfloat16))  # an LM head
    assert cpu_gemv.fits(torch.randn(1536, 576).to(torch.bfloat16))


@pytest.mark.skipif(not packing_supported(torch.bfloat16, torch.device("cpu")),
                    reason="oneDNN cannot pack bf16 on this CPU")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_runs_decode_rows_on_the_kernel_and_prompts_on_onednn(bias):
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=bias).to(torch.bfloat16)
    layer = PackedLinear(linear)
    onednn = PackedLinear(linear, skinny_rows=0)
    assert layer.skinny_rows == cpu_gemv.MAX_ROWS and onednn.plain_weight is None
    with torch.inference_mode():
        for rows in (1, 3, cpu_gemv.MAX_ROWS):
            x = torch.randn(1, rows, 576).to(torch.bfloat16)
            assert torch.equal(layer(x), cpu_gemv.skinny_linear(x, linear.weight, linear.bias))
        x = torch.randn(1, cpu_gemv.MAX_ROWS + 1, 576).to(torch.bfloat16)
        assert torch.equal(layer(x), onednn(x))
        assert torch.equal(layer(x), linear(x))
    assert torch.equal(layer.weight, linear.weight)


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("BATON_CPU_GEMV", "0")
    cpu_gemv.kernel.cache_clear()
    try:
        assert cpu_gemv.kernel() is None
        assert not cpu_gemv.fits(torch.randn(64, 64).to(torch.bfloat16))
        with pytest.raises(RuntimeError, match="not available"):
            cpu_gemv.skinny_linear(torch.randn(1, 64).to(torch.bfloat16),
                                   torch.randn(64, 64).to(torch.bfloat16))
    finally:
        monkeypatch.delenv("BATON_CPU_GEMV")
        cpu_gemv.kernel.cache_clear()
    assert cpu_gemv.kernel() is not None
