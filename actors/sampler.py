"""Next-token choice for a batch whose rows each carry their own sampling parameters."""

from __future__ import annotations

import torch

from baton.kernels.cpu_logits import argmax_rows
from baton.outputs import TokenLogprob
from baton.sampling import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Mask (to -inf) what falls outside each row's top-k and nucleus; k=0 / p=1 keep all."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    drop = ranks >= k.unsqueeze(-1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(-1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distributions `[N, V]` sampled rows draw from: temperature, then top-k and top-p.

    Speculative verification uses the very same distributions, so accepting drafts leaves what a
    request samples unchanged.
    """
    dev = logits.device
    # Each row less its largest logit, so that a temperature near 0 (down to float32's smallest
    # normal number; below it rounds to 0) gives the argmax, not an overflow to NaN.
    temps = torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float32)
    temps = temps.clamp_min(torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temps.unsqueeze(-1)
    top_k = torch.tensor([p.top_k for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        logits = _filter_top_k_top_p(logits, top_k, top_p)
    return logits.softmax(dim=-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of `logits [N, V]`.

    A row with a generator draws from it alone, so a seeded request gives the same tokens
    whatever else is in its batch. Log-probabilities are those of the model's raw distribution.
    """
    logits = logits.float()
    tokens = argmax_rows(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        probs = target_probs(logits.index_select(0, idx), [params[i] for i in rows])
        for j, i in enumerate(rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    token_list = tokens.tolist()
    return token_list, token_logprobs(logits, token_list, [p.logprobs for p in params])


def token_logprobs(logits: torch.Tensor, tokens: list[int],
                   num_top: list[int | None]) -> list[TokenLogprob | None]:
    """Log-probability of `tokens[i]` under row i's raw distribution, with the `num_top[i]` most
    likely alternatives (None: the request asked for no logprobs)."""
    logprobs: list[TokenLogprob | None] = [None] * len(tokens)
    want = [i for i, k in enumerate(num_top) if k is not None]
    if want:
        lp = logits.index_select(0, torch.tensor(want, device=logits.device)).log_softmax(-1)
        for j, i in enumerate(want):
            tok = tokens[i]
            top: dict[int, float] = {}
            k = num_top[i] or 0
            if k:
                vals, ids = lp[j].topk(k)
                top = dict(zip(ids.tolist(), vals.tolist(), strict=True))
            logprobs[i] = TokenLogprob(tok, float(lp[j, tok]), top)
    return logprobs
