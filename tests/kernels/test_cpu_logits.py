"""Reductions over logits rows on the CPU kernels: greedy tokens exactly as torch.argmax picks
them (ties, -inf, NaN, every tail length), and Medusa's top candidates with their
log-probabilities as torch's topk and logsumexp give them. Skipped where the kernels are not
built (no avx512_bf16, or BATON_CPU_KERNELS=0): there both functions are torch's own."""

from __future__ import annotations

import pytest
import torch

from baton.kernels import cpu_decode
from baton.kernels.cpu_logits import argmax_rows, top_logprobs

pytestmark = pytest.mark.skipif(not cpu_decode.wanted(),
                                reason="no avx512_bf16 here, or BATON_CPU_KERNELS=0")


def _rows(kind: str, rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "ties":  # few distinct values: the first of the maxima must win
        return torch.randint(0, 3, (rows, vocab), generator=gen).float()
    if kind == "zeros":  # 0.0 and -0.0 are equal
        signs = torch.randint(0, 2, (rows, vocab), generator=gen).float() * 2 - 1
        return torch.zeros(rows, vocab) * signs
    x = torch.randn(rows, vocab, generator=gen)
    if kind == "ninf":
        x[:, ::2] = float("-inf")
        x[0] = float("-inf")
    if kind == "nan":
        x[0, vocab // 2] = float("nan")
        x[-1, vocab - 1] = float("nan")
        x[-1, 0] = float("inf")
    return x


@pytest.mark.parametrize("vocab", [1, 3, 15, 16, 17, 31, 33, 100, 5089, 49152])
@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "ninf", "nan"])
def test_argmax_rows_is_torch_argmax(vocab, kind):
    gen = torch.Generator().manual_seed(vocab)
    for rows in (1, 2, 9, 17):
        logits = _rows(kind, rows, vocab, gen)
        assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1)), (rows, kind)


def test_argmax_rows_takes_a_view_of_rows():
    """A verify step's rows are a slice of the step's logits."""
    logits = torch.randn(20, 49152, generator=torch.Generator().manual_seed(1))
    part = logits[3:12]
    assert torch.equal(argmax_rows(part), part.argmax(dim=-1))
    strided = logits[::2, 5:]
    assert torch.equal(argmax_rows(strided), strided.argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [1, 7, 16, 100, 5089])
def test_top_logprobs_match_topk_and_logsumexp(dtype, size):
    gen = torch.Generator().manual_seed(size)
    k = min(4, size)
    logits = torch.randn(3, size, generator=gen).clamp(max=2.0)
    for row in logits:  # the top k distinct (in bf16 too), so their order is defined
        row[torch.randperm(size, generator=gen)[:k]] = torch.arange(k, 0, -1).float() + 2
    logits = logits.to(dtype)
    lp, ids = top_logprobs(logits, 4)
    top, want = logits.topk(k, dim=-1)
    assert lp.shape == ids.shape == (3, k)
    assert torch.equal(ids, want)
    expected = top.float() - torch.logsumexp(logits.float(), -1, keepdim=True)
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)


def test_top_logprobs_keep_leading_dims_and_prefer_the_earlier_of_a_tie():
    logits = torch.zeros(2, 3, 40)
    logits[..., 7] = 2.0
    logits[..., 30] = 1.0
    logits[..., 12] = 1.0
    lp, ids = top_logprobs(logits, 3)
    assert ids.shape == (2, 3, 3)
    assert ids[0, 0].tolist() == [7, 12, 30]
    torch.testing.assert_close(lp.exp().sum(-1), (logits.exp()[..., [7, 12, 30]]
                                                  / logits.exp().sum(-1, keepdim=True)).sum(-1))
