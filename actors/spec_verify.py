"""Verifying a draft against the target model's logits, losslessly.

Greedy requests accept a drafted token while it equals the target's argmax. Sampled requests use
speculative rejection sampling: a token drafted from a distribution `q` is accepted with
probability min(1, p(x) / q(x)), and a rejection resamples from the normalized residual
max(p - q, 0); a deterministic guess is the case q = one-hot. Several deterministic candidates
under one node (a tree) are tried in turn, each against what the earlier rejections left of p
(SpecInfer's multi-candidate rule). Either way the emitted token follows p exactly, whatever was
drafted, so a method changes the speed of a request, never what it samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from baton.actors.draft_tree import DraftTree
from baton.actors.sampler import target_probs
from baton.kernels.cpu_logits import argmax_rows
from baton.sampling import SamplingParams


@dataclass(slots=True)
class Verdict:
    """What a verified draft yields: accepted nodes (root to leaf), then one token of the
    target's own; `rows[i]` is the logits row `tokens[i]` was chosen from."""

    path: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


def verify(draft: DraftTree, logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> Verdict:
    """Walk `draft` from its root; `logits [len(draft) + 1, V]`, row 0 the root's, row i + 1
    node i's."""
    if params.greedy:
        return _verify_greedy(draft, argmax_rows(logits).tolist())
    probs = target_probs(logits.float(), [params] * logits.shape[0])
    return _verify_sampled(draft, probs, generator)


def _verify_greedy(draft: DraftTree, best: list[int]) -> Verdict:
    out = Verdict()
    node, row = -1, 0
    while True:
        token = best[row]
        out.tokens.append(token)
        out.rows.append(row)
        nxt = next((c for c in draft.children(node) if draft.tokens[c] == token), None)
        if nxt is None:
            return out
        out.path.append(nxt)
        node, row = nxt, nxt + 1


def _verify_sampled(draft: DraftTree, probs: torch.Tensor,
                    generator: torch.Generator | None) -> Verdict:
    out = Verdict()
    node, row = -1, 0
    while True:
        p = probs[row]
        accepted = None
        for child in draft.children(node):
            x = draft.tokens[child]
            if draft.probs is not None:  # drafted from q: accept with min(1, p/q)
                q = draft.probs[child]
                if _uniform(generator) * float(q[x]) < float(p[x]):
                    accepted = child
                else:
                    p = _normalized(torch.clamp(p - q, min=0), p)
                break
            # A deterministic candidate: accept with its share of what is left of p.
            total = float(p.sum())
            if total > 0 and _uniform(generator) * total < float(p[x]):
                accepted = child
                break
            p = p.clone()
            p[x] = 0.0
        if accepted is None:
            token = int(torch.multinomial(_normalized(p, probs[row]), 1, generator=generator))
            out.tokens.append(token)
            out.rows.append(row)
            return out
        out.path.append(accepted)
        out.tokens.append(draft.tokens[accepted])
        out.rows.append(row)
        node, row = accepted, accepted + 1


def _uniform(generator: torch.Generator | None) -> float:
    device = generator.device if generator is not None else "cpu"
    return float(torch.rand(1, generator=generator, device=device))


def _normalized(p: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """`p / p.sum()`; the target's own distribution when rounding left nothing of `p`."""
    total = p.sum()
    return p / total if float(total) > 0 else fallback
