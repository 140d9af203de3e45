"""oneDNN-packed CPU linears give `nn.Linear`'s results, on whatever CPU runs them.

Each test compares the two paths in one process. A layer's outputs agree within one unit in the
last place of the output dtype, not always bit for bit: on a Xeon with AMX, oneDNN runs the packed
weight on other kernels than `F.linear`'s for some shapes (bf16 at 64 rows, fp16 at one row: up
to 8 outputs in 98,304 one unit apart); on the EPYCs all were equal. The tiny model's tokens and
logprobs were equal on every CPU so far. Skipped where oneDNN cannot pack
the dtype (CPUs without avx512 / AMX / avx_ne_convert). The claim is oneDNN's: decode-sized calls
that the skinny kernel takes instead are tests/kernels/test_cpu_decode.py's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baton.actors import model_runner
from baton.actors.cpu_linear import PackedLinear, packing_supported
from baton.actors.engine import Engine
from baton.kernels import cpu_decode
from baton.sampling import SamplingParams

CPU = torch.device("cpu")
PACKABLE = [pytest.param(dtype, marks=pytest.mark.skipif(
    not packing_supported(dtype, CPU), reason=f"oneDNN cannot pack {dtype} on this CPU"))
    for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("dtype", PACKABLE)
@pytest.mark.parametrize("rows", [1, 3, 64])  # decode, a small batch, a prompt
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_nn_linear(dtype, rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=bias).to(dtype)  # the default model's MLP shape
    x = torch.randn(1, rows, 576).to(dtype)
    with torch.inference_mode():
        packed, plain = PackedLinear(linear, skinny_rows=0)(x), linear(x)
    # one unit in the last place of the larger value, or a few fp32 roundings of the sum where
    # the output is near zero (the two kernels add the 576 products in different orders)
    torch.testing.assert_close(packed, plain, rtol=torch.finfo(dtype).eps, atol=1e-4)


@pytest.mark.parametrize("dtype", PACKABLE)
def test_a_packed_linear_still_shows_its_weight(dtype):
    """Code that reads a layer's weight (layer-skip calibration reads the LM head's) gets the
    weight it was packed from, exactly."""
    linear = nn.Linear(576, 1536, bias=False).to(dtype)
    packed = PackedLinear(linear)
    assert packed.weight.dtype == dtype
    assert torch.equal(packed.weight, linear.weight)


@pytest.mark.parametrize("dtype", PACKABLE)
def test_engine_gives_the_same_tokens_and_logprobs_packed_or_not(dtype, monkeypatch):
    monkeypatch.setattr(cpu_decode, "skinny_rows", lambda _weight: 0)  # oneDNN for every call
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    packed = Engine("tiny:llama", dtype=name)
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    monkeypatch.setattr(model_runner, "packing_supported", lambda *_: False)
    plain = Engine("tiny:llama", dtype=name)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    prompts = [[3, 1, 4, 1, 5], list(range(40, 90))]
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3)
    for a, b in zip(packed.generate(prompts, params), plain.generate(prompts, params),
                    strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs

