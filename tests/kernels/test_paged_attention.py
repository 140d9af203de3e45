"""Paged attention (decode and draft verification): the Triton kernel against the reference."""

from __future__ import annotations

import pytest
import torch

from baton.errors import ConfigError
from baton.kernels import paged_attention_triton
from baton.kernels.dispatch import force_backend
from baton.kernels.paged_attention import paged_attention, paged_attention_reference
from tests.kernels.conftest import DEVICE, assert_close


def _case(context_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """Caches with each sequence's blocks scattered at random, and packed queries."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(per_seq) + 3
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(context_lens), max(per_seq), dtype=torch.long)
    used = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = order[used:used + n]
        used += n
    shape = (kv_heads, num_blocks, block_size, head_dim)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    ctx = torch.tensor(context_lens)
    return [t.to(DEVICE) for t in (q, k, v, tables, ctx, starts)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("context_lens", "heads", "kv_heads", "head_dim", "block_size"), [
    ([1], 4, 4, 16, 16),  # a sequence of one token
    ([16, 17, 33, 5], 4, 2, 64, 16),  # ragged, on and just past block boundaries; GQA
    ([9, 40], 8, 1, 24, 4),  # all heads on one kv head; head_dim and blocks not 16
])
def test_decode_matches_reference(triton_path, dtype, context_lens, heads, kv_heads, head_dim,
                                  block_size):
    q, k, v, tables, ctx, _ = _case(context_lens, [1] * len(context_lens), heads, kv_heads,
                                    head_dim, block_size, dtype)
    out = paged_attention(q, k, v, tables, ctx)
    expected = paged_attention_reference(q, k, v, tables, ctx, None, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_is_causal_within_each_sequences_drafts(triton_path, dtype):
    context_lens, query_lens = [5, 16, 30], [1, 4, 3]
    q, k, v, tables, ctx, starts = _case(context_lens, query_lens, 4, 2, 32, 8, dtype)
    out = paged_attention(q, k, v, tables, ctx, starts, max_query_len=4)
    expected = paged_attention_reference(q, k, v, tables, ctx, starts, 32**-0.5)
    assert_close(out, expected, dtype)
    # The first draft of a sequence sees exactly what a one-token decode step would see.
    first = starts[1]
    trimmed = ctx.clone()
    trimmed[1] -= query_lens[1] - 1
    decode = paged_attention(q[starts[:-1]], k, v, tables, trimmed)
    assert_close(out[first], decode[1], dtype)


def test_sliding_window_hides_old_context(triton_path):
    q, k, v, tables, ctx, starts = _case([40, 7], [2, 2], 2, 2, 16, 16, torch.float32)
    out = paged_attention(q, k, v, tables, ctx, starts, max_query_len=2, sliding_window=8)
    expected = paged_attention_reference(q, k, v, tables, ctx, starts, 0.25, sliding_window=8)
    assert_close(out, expected, torch.float32)
    full = paged_attention_reference(q, k, v, tables, ctx, starts, 0.25)
    assert not torch.allclose(out[:2], full[:2])  # the window made a difference


def test_default_path_is_the_kernel_on_cuda_and_the_reference_elsewhere(monkeypatch):
    kernel = paged_attention_triton.paged_attention_triton
    calls = []

    def spy(*args):
        calls.append(args)
        return kernel(*args)

    monkeypatch.setattr(paged_attention_triton, "paged_attention_triton", spy)
    q, k, v, tables, ctx, _ = _case([3, 20], [1, 1], 2, 1, 16, 16, torch.float32)
    out = paged_attention(q, k, v, tables, ctx)
    expected = paged_attention_reference(q, k, v, tables, ctx, None, 0.25)
    if DEVICE.type == "cuda":
        assert len(calls) == 1
        assert_close(out, expected, torch.float32)
    else:  # the CPU never runs Triton's interpreter outside tests
        assert calls == []
        assert torch.equal(out, expected)


def test_shapes_that_cannot_group_are_refused():
    q, k, v, tables, ctx, _ = _case([3], [1], 3, 2, 16, 16, torch.float32)
    with pytest.raises(ConfigError, match="do not group"):
        paged_attention(q, k, v, tables, ctx)
    q, k, v, tables, ctx, _ = _case([3, 4], [1, 1], 2, 2, 16, 16, torch.float32)
    with pytest.raises(ConfigError, match="one query per sequence"):
        paged_attention(q[:1], k, v, tables, ctx)


def test_engine_decodes_the_same_tokens_through_the_kernel():
    """The engine's attention hands decode steps to the kernel (CUDA's path), same greedy text."""
    from baton.actors.engine import Engine
    from baton.sampling import SamplingParams

    engine = Engine("tiny:qwen3", dtype="float32", device=str(DEVICE), num_kv_blocks=32,
                    block_size=4)
    prompts = [[5, 9, 2, 6, 5, 3], [7], [1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with force_backend("torch"):
        expected = [o.token_ids for o in engine.generate(prompts, params)]
    with force_backend("triton"):
        got = [o.token_ids for o in engine.generate(prompts, params)]
    assert got == expected
