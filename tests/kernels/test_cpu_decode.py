"""Baton's skinny bf16 CPU matmul: exact sums rounded once, the shapes it takes and refuses, and
the packed linear layers that hand it their decode-sized calls.

Skipped on CPUs without avx512_bf16 (where oneDNN runs every linear) and with the kernel off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baton.actors.cpu_linear import PackedLinear, packing_supported
from baton.kernels import cpu_decode

pytestmark = pytest.mark.skipif(cpu_decode.kernel() is None,
                                reason="no avx512_bf16 here, or BATON_CPU_KERNELS=0")


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
    y = cpu_decode.skinny_linear(x, w, bias)
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
        cpu_decode.skinny_linear(torch.randn(1, 48).to(torch.bfloat16), w)
    assert not cpu_decode.fits(w)
    assert not cpu_decode.fits(torch.randn(8, 64))  # float32: oneDNN's
    assert not cpu_decode.fits(torch.randn(49152, 576).to(torch.bfloat16))  # an LM head
    assert cpu_decode.fits(torch.randn(1536, 576).to(torch.bfloat16))


@pytest.mark.skipif(not packing_supported(torch.bfloat16, torch.device("cpu")),
                    reason="oneDNN cannot pack bf16 on this CPU")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_runs_decode_rows_on_the_kernel_and_prompts_on_onednn(bias):
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=bias).to(torch.bfloat16)
    layer = PackedLinear(linear)
    onednn = PackedLinear(linear, skinny_rows=0)
    assert layer.skinny_rows == cpu_decode.MAX_ROWS and onednn.plain_weight is None
    with torch.inference_mode():
        for rows in (1, 3, cpu_decode.MAX_ROWS):
            x = torch.randn(1, rows, 576).to(torch.bfloat16)
            assert torch.equal(layer(x), cpu_decode.skinny_linear(x, linear.weight, linear.bias))
        x = torch.randn(1, cpu_decode.MAX_ROWS + 1, 576).to(torch.bfloat16)
        assert torch.equal(layer(x), onednn(x))
        assert torch.equal(layer(x), linear(x))
    assert torch.equal(layer.weight, linear.weight)


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("BATON_CPU_KERNELS", "0")
    cpu_decode.kernel.cache_clear()
    try:
        assert cpu_decode.kernel() is None
        assert not cpu_decode.fits(torch.randn(64, 64).to(torch.bfloat16))
        with pytest.raises(RuntimeError, match="not available"):
            cpu_decode.skinny_linear(torch.randn(1, 64).to(torch.bfloat16),
                                   torch.randn(64, 64).to(torch.bfloat16))
    finally:
        monkeypatch.delenv("BATON_CPU_KERNELS")
        cpu_decode.kernel.cache_clear()
    assert cpu_decode.kernel() is not None


def torch_decode_attention(q, k_cache, v_cache, tables, lens, scale):
    """The same step in float64 torch: each sequence's blocks gathered, plain softmax."""
    b, h, d = q.shape
    n_kv, _, bs, _ = k_cache.shape
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        keys = k_cache[:, tables[i]].reshape(n_kv, -1, d)[:, :n].double()
        values = v_cache[:, tables[i]].reshape(n_kv, -1, d)[:, :n].double()
        qi = q[i].double().view(n_kv, h // n_kv, d)
        probs = (qi @ keys.transpose(-1, -2) * scale).softmax(-1)
        out[i] = (probs @ values).reshape(h, d)
    return out


@pytest.mark.parametrize(("n_kv", "groups", "d"), [(3, 3, 64), (2, 1, 16), (1, 8, 128)])
def test_decode_attention_matches_attention_over_the_gathered_blocks(n_kv, groups, d):
    """Contexts of one key, a block boundary, a ragged tail and several blocks, each sequence
    on scattered blocks of its own: every output within bf16 rounding of float64 attention."""
    torch.manual_seed(n_kv * 100 + d)
    bs, num_blocks, nb = 16, 64, 12
    k_cache = torch.randn(n_kv, num_blocks, bs, d).to(torch.bfloat16)
    v_cache = torch.randn(n_kv, num_blocks, bs, d).to(torch.bfloat16)
    lens = torch.tensor([1, 16, 17, 150, nb * bs])
    tables = torch.stack([torch.randperm(num_blocks)[:nb] for _ in lens])
    q = (torch.randn(len(lens), n_kv * groups, d) * 3).to(torch.bfloat16)
    scale = d**-0.5
    out = cpu_decode.decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    exact = torch_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert ((out.double() - exact).abs() <= exact.abs() * 2.0**-7 + 1e-4).all()
    # One key: the output is that key's value, exactly.
    assert torch.equal(out[0].view(n_kv, groups, d),
                       v_cache[:, tables[0, 0], 0].unsqueeze(1).expand(n_kv, groups, d))


def test_decode_attention_refuses_a_context_longer_than_its_table():
    k_cache = torch.zeros(1, 4, 16, 16, dtype=torch.bfloat16)
    q = torch.zeros(1, 1, 16, dtype=torch.bfloat16)
    tables = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="context length 33 out of the table"):
        cpu_decode.decode_attention(q, k_cache, k_cache, tables, torch.tensor([33]), 0.25)
    assert not cpu_decode.takes_decode_attention(q.float(), k_cache)  # float32: torch's path


def test_a_bf16_engine_decodes_on_the_kernels_as_on_the_torch_path(monkeypatch):
    """The same greedy requests through one engine with the kernels on and off: the same tokens
    and logprobs within bf16 rounding, up to a near tie where the two paths may part."""
    from baton.actors import paged_attention
    from baton.actors.engine import Engine
    from baton.sampling import SamplingParams

    calls = []
    real = cpu_decode.decode_attention
    monkeypatch.setattr(cpu_decode, "decode_attention",
                        lambda *a: calls.append(1) or real(*a))
    engine = Engine("tiny:llama", dtype="bfloat16")
    assert any(getattr(m, "skinny_rows", 0) for m in engine.model.modules())
    prompts = [list(range(5, 40)), [3, 1, 4, 1, 5]]
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=5)
    on = engine.generate(prompts, params)
    assert calls, "decode steps did not reach the kernel"
    monkeypatch.setattr(paged_attention.cpu_decode, "takes_decode_attention", lambda *_: False)
    for layer in engine.model.modules():
        if isinstance(layer, PackedLinear):
            layer.skinny_rows = 0
    calls.clear()
    off = engine.generate(prompts, params)
    assert not calls
    for a, b in zip(on, off, strict=True):
        parted = [i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True))
                  if x != y]
        n = parted[0] if parted else len(a.token_ids)
        for i in range(n):
            assert abs(a.logprobs[i].logprob - b.logprobs[i].logprob) < 0.05
        if parted:  # the torch path's choice was within rounding of the kernels' best
            assert a.logprobs[n].top[b.token_ids[n]] > a.logprobs[n].logprob - 0.05
