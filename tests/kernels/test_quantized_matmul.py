"""Weight-only int8/int4 matmul: quantization error bounds, kernel against reference."""

from __future__ import annotations

import pytest
import torch

from baton.errors import ConfigError
from baton.kernels.dispatch import force_backend
from baton.kernels.quantized_matmul import (
    dequantize_int4,
    int4_matmul,
    int4_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    quantize_int4,
    quantize_int8,
)
from tests.kernels.conftest import DEVICE, assert_close


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _activations(*shape, dtype, seed=1):
    """Inputs scaled as a model's are (unit-size outputs), so tolerances mean the same at any K."""
    return _rand(*shape, dtype=torch.float32, seed=seed).mul(shape[-1] ** -0.5).to(dtype)


def test_int8_weights_round_trip_within_half_a_step():
    w = _rand(48, 80)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_weights_round_trip_within_half_a_step(group_size):
    w = _rand(24, 256)
    q, scales, zeros = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and q.shape == (24, 128)
    assert scales.shape == zeros.shape == (24, 256 // group_size)
    err = (dequantize_int4(q, scales, zeros) - w).abs().view(24, -1, group_size)
    assert (err <= scales[..., None] / 2 + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k", "bias"), [
    (1, 64, 64, False),  # one decode token
    (5, 70, 80, True),  # ragged: neither N nor K a tile multiple
    (33, 16, 128, False),  # more rows than one tile
])
def test_int8_kernel_matches_reference(triton_path, dtype, m, n, k, bias):
    x = _activations(m, k, dtype=dtype)
    q, scales = quantize_int8(_rand(n, k, dtype=dtype))
    b = _rand(n, dtype=dtype, seed=2) if bias else None
    assert_close(int8_matmul(x, q, scales, b), int8_matmul_reference(x, q, scales, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k", "group_size"), [
    (1, 64, 128, 32),
    (3, 40, 192, 64),
    (17, 64, 256, 128),
])
def test_int4_kernel_matches_reference(triton_path, dtype, m, n, k, group_size):
    x = _activations(2, m, k, dtype=dtype)  # leading batch axes are kept
    q, scales, zeros = quantize_int4(_rand(n, k, dtype=dtype), group_size)
    out = int4_matmul(x, q, scales, zeros)
    assert out.shape == (2, m, n) and out.dtype == dtype
    assert_close(out, int4_matmul_reference(x, q, scales, zeros), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_path_matches_reference(dtype):
    """On the CPU, int8 runs PyTorch's packed int8 matmul; it computes the same product."""
    x = _activations(3, 96, dtype=dtype)
    q, scales = quantize_int8(_rand(32, 96, dtype=dtype))
    with force_backend("torch"):
        out = int8_matmul(x, q, scales)
    assert_close(out, int8_matmul_reference(x, q, scales), dtype)


def test_quantized_product_stays_close_to_the_float_one():
    x, w = _rand(4, 256, seed=1), _rand(64, 256)
    exact = x @ w.T
    rel8 = (int8_matmul_reference(x, *quantize_int8(w)) - exact).norm() / exact.norm()
    rel4 = (int4_matmul_reference(x, *quantize_int4(w, 32)) - exact).norm() / exact.norm()
    assert rel8 < 0.01 and rel4 < 0.1


def test_unsupported_group_sizes_are_refused():
    with pytest.raises(ConfigError, match="group size must be one of"):
        quantize_int4(_rand(8, 96), 48)
    with pytest.raises(ConfigError, match="not a multiple"):
        quantize_int4(_rand(8, 96), 64)
    q, scales = quantize_int8(_rand(8, 32))
    with pytest.raises(ConfigError, match="features"):
        int8_matmul(_rand(2, 16), q, scales)
