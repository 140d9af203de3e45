"""Candidate trees from Medusa heads: which drafted tokens one verify pass checks.

Every node's score is the product of the heads' probabilities along its path: what the heads
believe is the chance that the path is the model's own continuation, so the scores summed are the
accepted length the heads expect. Trees keep the best-scoring nodes, best first; a node never
outscores its parent, so every prefix of a tree is a tree too (the engine cuts trees to the
size that pays, `DraftTree.prefix`).

Plain Medusa-1 heads do not see the drafted tokens: every node at depth d chooses among head d's
same candidates (`tree_from_candidates`). Token-conditioned heads (`MedusaHeads.conditioned`) see
the token before the one they predict, so each node's children come from its own pass of the
next head (`conditioned_trees`, level by level, batched over requests).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import torch

from baton.actors.draft_tree import DraftTree
from baton.kernels.cpu_logits import top_logprobs

if TYPE_CHECKING:
    from baton.actors.medusa import MedusaHeads

Scored = tuple[DraftTree, list[float]]


def top_candidates(head_logits: torch.Tensor, top_k: int, token_ids: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's `top_k` tokens and their probabilities, for any leading shape:
    `head_logits [..., S]` over `token_ids [S]` (None: the whole vocabulary) ->
    (probabilities [..., top_k], token ids [..., top_k]), best first."""
    if top_k < 1:
        raise ValueError(f"need top_k >= 1, got {top_k}")
    logprobs, top_ids = top_logprobs(head_logits, top_k)
    return logprobs.exp(), top_ids if token_ids is None else token_ids[top_ids]


def propose_tree(head_logits: torch.Tensor, max_nodes: int, top_k: int,
                 token_ids: torch.Tensor | None = None) -> Scored:
    """The sparse candidate tree after the next token (the root: sampled, its KV not yet
    computed), and each node's score; `head_logits` is [K, S]: plain heads' logits at the
    position that produced the next token, over `token_ids [S]` (None: the whole vocabulary,
    S = V). See `tree_from_candidates`."""
    if head_logits.dim() != 2:
        raise ValueError(f"head_logits must be [K, V], got {tuple(head_logits.shape)}")
    probs, ids = top_candidates(head_logits, top_k, token_ids)
    return tree_from_candidates(probs.tolist(), ids.tolist(), max_nodes)


def tree_from_candidates(probs: list[list[float]], ids: list[list[int]],
                         max_nodes: int) -> Scored:
    """The tree of plain heads' candidates (`probs[d]`, `ids[d]`: head d's, best first) and each
    node's score: the `max_nodes` best-scoring nodes, best first."""
    if max_nodes < 0:
        raise ValueError(f"need max_nodes >= 0, got {max_nodes}")
    num_heads = len(probs)
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    order = 0  # tie-break: earlier pushes (higher parents, better ranks) first
    frontier: list[tuple[float, int, int, int, int]] = []  # (-score, order, parent, depth, rank)
    for rank, p in enumerate(probs[0] if num_heads else []):
        frontier.append((-p, order, -1, 0, rank))
        order += 1
    heapq.heapify(frontier)
    while frontier and len(tokens) < max_nodes:
        neg_score, _, parent, depth, rank = heapq.heappop(frontier)
        node = len(tokens)
        tokens.append(ids[depth][rank])
        parents.append(parent)
        scores.append(-neg_score)
        if depth + 1 < num_heads:
            for child_rank, p in enumerate(probs[depth + 1]):
                heapq.heappush(frontier, (neg_score * p, order, node, depth + 1, child_rank))
                order += 1
    return DraftTree(tokens, parents), scores


def draft_trees(heads: MedusaHeads, hidden: torch.Tensor, roots: list[int], max_nodes: int,
                top_k: int, min_scores: list[float] | None = None) -> list[Scored]:
    """One scored tree per row of `hidden [N, H]` (the hidden state that produced the root
    token `roots[n]`), with at most `max_nodes` nodes and `top_k` children per node. Conditioned
    heads do not expand request n's nodes scoring below `min_scores[n]` (see
    `conditioned_trees`)."""
    if max_nodes < 0:
        raise ValueError(f"need max_nodes >= 0, got {max_nodes}")
    if heads.conditioned:
        return conditioned_trees(heads, hidden, roots, max_nodes, top_k, min_scores=min_scores)
    logits, token_ids = heads.candidates(hidden)  # [K, N, S]
    probs, ids = top_candidates(logits.transpose(0, 1), top_k, token_ids)
    return [tree_from_candidates(p, i, max_nodes)
            for p, i in zip(probs.tolist(), ids.tolist(), strict=True)]


def conditioned_trees(heads: MedusaHeads, hidden: torch.Tensor, roots: list[int],
                      max_nodes: int, top_k: int, beam: int | None = None,
                      min_scores: list[float] | None = None) -> list[Scored]:
    """Trees of token-conditioned heads. Depth d runs head d once over the `beam` best nodes of
    depth d - 1 of every request (the roots at depth 0), each with that node's token; their
    `top_k` children scored by path probability; a request keeps its `max_nodes` best nodes.
    `beam` defaults to `top_k`: the nodes past it rarely make a tree of `max_nodes`.

    Request n's nodes scoring below `min_scores[n]` stay leaves: their children would score
    lower still, and a node that cannot pay for its place in the step is never drafted, so
    the heads' passes deeper down (each reads the LM head's rows again) would be wasted."""
    beam = top_k if beam is None else beam
    n = hidden.shape[0]
    if len(roots) != n or (min_scores is not None and len(min_scores) != n):
        raise ValueError(f"{n} hidden states but {len(roots)} root tokens"
                         f"{'' if min_scores is None else f' and {len(min_scores)} floors'}")
    floors = [0.0] * n if min_scores is None else min_scores
    # Per request, its nodes as (score, depth, parent, token), parents indexing the same list.
    nodes: list[list[tuple[float, int, int, int]]] = [[] for _ in range(n)]
    # The nodes to expand next: (request, node index or -1 for the root, score, token).
    frontier = [(r, -1, 1.0, roots[r]) for r in range(n)] if max_nodes else []
    proj = heads.hidden_projections(hidden) if frontier else None  # [K, N, F]
    for depth in range(heads.num_heads):
        if not frontier:
            break
        assert proj is not None
        rows = torch.tensor([f[0] for f in frontier], device=hidden.device)
        prev = torch.tensor([f[3] for f in frontier], device=hidden.device)
        logits, token_ids = heads.conditioned_candidates(depth, proj[depth, rows], hidden[rows],
                                                         prev)
        probs, ids = top_candidates(logits, top_k, token_ids)
        children: list[list[tuple[float, int, int]]] = [[] for _ in range(n)]
        for (r, parent, score, _), ps, ts in zip(frontier, probs.tolist(), ids.tolist(),
                                                 strict=True):
            children[r].extend((score * p, parent, t) for p, t in zip(ps, ts, strict=True))
        frontier = []
        for r, kids in enumerate(children):
            kids.sort(key=lambda kid: -kid[0])
            for rank, (score, parent, token) in enumerate(kids[:max_nodes]):
                if rank < beam and depth + 1 < heads.num_heads and score >= floors[r]:
                    frontier.append((r, len(nodes[r]), score, token))
                nodes[r].append((score, depth, parent, token))
    return [_best_first(request_nodes, max_nodes) for request_nodes in nodes]


def _best_first(nodes: list[tuple[float, int, int, int]], max_nodes: int) -> Scored:
    """The `max_nodes` best of `nodes` as a tree, best first (a parent, never worse than its
    children and shallower, sorts before them)."""
    order = sorted(range(len(nodes)), key=lambda i: (-nodes[i][0], nodes[i][1], i))[:max_nodes]
    position = {old: new for new, old in enumerate(order)}
    tokens = [nodes[i][3] for i in order]
    parents = [-1 if nodes[i][2] < 0 else position[nodes[i][2]] for i in order]
    return DraftTree(tokens, parents), [nodes[i][0] for i in order]
