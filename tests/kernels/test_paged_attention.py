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


def _tree_mask(query_lens, trees):
    """Packed `[T, max_query_len]` rows: causal within each run, draft trees (sequence ->
    parents of the nodes after the run's first query, the root) by ancestry."""
    q = max(query_lens)
    rows = []
    for b, n in enumerate(query_lens):
        m = torch.ones(n, q, dtype=torch.bool).tril()
        m[:, n:] = False
        if b in trees:
            m[1:, 1:] = False
            for i, parent in enumerate(trees[b]):
                if parent >= 0:
                    m[i + 1, 1:] = m[parent + 1, 1:]
                m[i + 1, i + 1] = True
        rows.append(m)
    return torch.cat(rows).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_under_a_tree_mask_sees_only_ancestors(triton_path, dtype):
    """Two branches under the root, each two deep, next to a plain chain: the kernel applies the
    tree and the chain alike, as the reference does, and the tree changes what nodes see."""
    context_lens, query_lens = [12, 21, 9], [5, 3, 1]
    trees = {0: [-1, -1, 0, 1]}  # root -> a, b; a -> c; b -> d
    q, k, v, tables, ctx, starts = _case(context_lens, query_lens, 6, 2, 32, 8, dtype)
    mask = _tree_mask(query_lens, trees)
    out = paged_attention(q, k, v, tables, ctx, starts, max_query_len=5, tree_mask=mask)
    expected = paged_attention_reference(q, k, v, tables, ctx, starts, 32**-0.5, tree_mask=mask)
    assert_close(out, expected, dtype)
    causal = paged_attention_reference(q, k, v, tables, ctx, starts, 32**-0.5)
    assert_close(out[:2], causal[:2], dtype)  # the root and the first node: nothing to hide
    assert_close(out[5:], causal[5:], dtype)  # the chains of the other sequences
    assert not torch.allclose(out[2:5].float(), causal[2:5].float(), atol=1e-2)


def test_tree_mask_of_the_wrong_shape_is_refused():
    q, k, v, tables, ctx, starts = _case([8], [3], 2, 2, 16, 8, torch.float32)
    with pytest.raises(ConfigError, match="tree_mask must be"):
        paged_attention(q, k, v, tables, ctx, starts, max_query_len=3,
                        tree_mask=torch.ones(3, 2, dtype=torch.bool))


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


def test_engine_decodes_and_verifies_the_same_tokens_through_the_kernel(monkeypatch):
    """The engine hands decode steps and draft verification (prompt-lookup chains, lookahead
    trees) to the kernel, CUDA's path, and gets the same greedy tokens."""
    from baton.actors.draft_tree import DraftTree
    from baton.actors.engine import Engine
    from baton.sampling import SamplingParams

    engine = Engine("tiny:qwen3", dtype="float32", device=str(DEVICE), num_kv_blocks=48,
                    block_size=4, methods=["ngram", "lookahead"])
    prompts = [[5, 9, 2, 6, 5, 3], [7], [1, 4, 1, 5, 9, 2, 6, 5, 3, 5] * 2]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with force_backend("torch"):
        expected = [o.token_ids for o in engine.generate(prompts, params)]

    def propose(request_id, context, max_nodes):
        # Two branches under the root; the greedy token is always the second one.
        prompt, want = next((p, w) for p, w in zip(prompts, expected, strict=True)
                            if context[:len(p)] == p)
        nxt = (want + [0, 0])[len(context) - len(prompt):][:2]
        return DraftTree([(nxt[0] + 1) % 256, nxt[0], nxt[1]], [-1, -1, 1])

    monkeypatch.setattr(engine.speculator.lookahead, "propose", propose)
    kernel = paged_attention_triton.paged_attention_triton
    trees = []

    def spy(*args):
        trees.append(args[-1] is not None)
        return kernel(*args)

    monkeypatch.setattr(paged_attention_triton, "paged_attention_triton", spy)
    with force_backend("triton"):
        for method in ("ngram", "lookahead"):
            got = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True,
                                                          method=method))
            assert [o.token_ids for o in got] == expected, method
    assert sum(o.metrics.spec_accepted_tokens for o in got) > 0  # second branches accepted
    assert any(trees) and not all(trees)
