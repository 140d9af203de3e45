"""Candidate trees from Medusa heads: the likeliest paths, best first, every prefix a tree; a
token-conditioned head's children follow their parent's token."""

from __future__ import annotations

import itertools

import pytest
import torch

from baton.actors.medusa import MedusaHeads
from baton.actors.medusa_trees import conditioned_trees, draft_trees, propose_tree
from baton.actors.tiny import tiny_model

# -- propose_tree ----------------------------------------------------------------------------------


def _paths(tree) -> list[tuple[int, ...]]:
    out = []
    for i in range(len(tree)):
        path, node = [], i
        while node >= 0:
            path.append(tree.tokens[node])
            node = tree.parents[node]
        out.append(tuple(reversed(path)))
    return out


def _logits(num_heads: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(num_heads, vocab, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_nodes, top_k", [(1, 3), (6, 3), (20, 4), (64, 10)])
def test_tree_keeps_the_likeliest_paths(seed, max_nodes, top_k):
    num_heads = 3
    logits = _logits(num_heads, 50, seed)
    tree, scores = propose_tree(logits, max_nodes=max_nodes, top_k=top_k)

    probs = logits.softmax(-1)
    top = probs.topk(top_k, dim=-1)
    every = {}  # path of tokens -> product of head probabilities
    for depth in range(1, num_heads + 1):
        for ranks in itertools.product(range(top_k), repeat=depth):
            path = tuple(top.indices[d, r].item() for d, r in enumerate(ranks))
            every[path] = float(torch.tensor([top.values[d, r] for d, r in enumerate(ranks)]
                                             ).prod())
    best = sorted(every, key=every.__getitem__, reverse=True)[: min(max_nodes, len(every))]

    paths = _paths(tree)
    assert len(tree) == min(max_nodes, len(every))
    assert set(paths) == set(best)
    assert max(tree.depths()) <= num_heads
    # Each node's score is its path's probability, best first: every prefix is a tree whose
    # expected accepted length is the sum of its scores.
    assert scores == pytest.approx([every[p] for p in paths], rel=1e-5)
    assert scores == sorted(scores, reverse=True)
    for n in range(len(tree) + 1):
        prefix = tree.prefix(n)
        assert prefix.tokens == tree.tokens[:n] and prefix.parents == tree.parents[:n]


def test_tree_with_one_candidate_per_head_is_the_chain_of_argmaxes():
    logits = _logits(4, 50, 0)
    tree, _ = propose_tree(logits, max_nodes=10, top_k=1)
    assert tree.is_chain
    assert tree.tokens == logits.argmax(-1).tolist()
    assert propose_tree(logits, max_nodes=2, top_k=1)[0].tokens == logits.argmax(-1)[:2].tolist()


def test_tree_over_a_vocabulary_subset_names_the_real_tokens():
    logits = _logits(3, 5, 0)
    token_ids = torch.tensor([4, 40, 41, 90, 200])
    tree, _ = propose_tree(logits, max_nodes=3, top_k=1, token_ids=token_ids)
    assert tree.tokens == token_ids[logits.argmax(-1)].tolist()


def test_tree_without_room_is_empty_and_bad_input_is_refused():
    assert len(propose_tree(_logits(2, 10, 0), max_nodes=0, top_k=2)[0]) == 0
    with pytest.raises(ValueError):
        propose_tree(torch.zeros(10), max_nodes=4, top_k=2)
    with pytest.raises(ValueError):
        propose_tree(torch.zeros(2, 10), max_nodes=4, top_k=0)


# -- token-conditioned heads -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def conditioned():
    heads = MedusaHeads.for_model(tiny_model("llama"), 3, conditioned=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in heads.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return heads.eval()


def _every_path(heads, hidden, root: int, top_k: int) -> dict[tuple[int, ...], float]:
    """Every path of the full tree from `root` (each node's children: the head's `top_k` given
    the node's token), with its probability."""
    every: dict[tuple[int, ...], float] = {}

    def walk(path: tuple[int, ...], prob: float, prev: int) -> None:
        if len(path) == heads.num_heads:
            return
        prevs = torch.full((heads.num_heads, 1), prev)  # only head len(path) is read
        top = heads(hidden, prevs)[len(path), 0].softmax(-1).topk(top_k)
        for p, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            every[path + (t,)] = prob * p
            walk(path + (t,), prob * p, t)

    walk((), 1.0, root)
    return every


@pytest.mark.parametrize("max_nodes, top_k", [(1, 2), (7, 3), (30, 3), (100, 2)])
def test_conditioned_tree_keeps_the_likeliest_paths_each_drafted_from_its_parent(
        conditioned, max_nodes, top_k):
    heads = conditioned
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    roots = [7, 100]
    # Expanding every node: the tree must be the best of all paths, each node's children being
    # the head's top tokens given that node's own token.
    trees = conditioned_trees(heads, hidden, roots, max_nodes, top_k, beam=10**6)
    for r, (tree, scores) in enumerate(trees):
        every = _every_path(heads, hidden[r : r + 1], roots[r], top_k)
        paths = _paths(tree)
        assert set(paths) == set(sorted(every, key=every.__getitem__, reverse=True)[:max_nodes])
        assert scores == pytest.approx([every[p] for p in paths], rel=1e-4)
        assert scores == sorted(scores, reverse=True)
        for n in range(len(tree) + 1):  # every prefix is a tree
            assert all(p < i for i, p in enumerate(tree.prefix(n).parents))


def test_conditioned_tree_children_differ_by_parent_and_beam_bounds_the_work(conditioned):
    hidden = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    (tree, _), = conditioned_trees(conditioned, hidden, [3], max_nodes=100, top_k=3, beam=10**6)
    assert len(tree) == 3 + 9 + 27  # every node expanded
    kids = {tuple(sorted(tree.tokens[c] for c in tree.children(n))) for n in tree.children(-1)}
    assert len(kids) > 1  # not one shared set of candidates, as plain heads have
    # By default only the best `top_k` nodes of a depth are expanded: one pass over 3 rows each.
    (tree, _), = conditioned_trees(conditioned, hidden, [3], max_nodes=100, top_k=3)
    assert len(tree) == 3 + 9 + 9
    # A request with no room drafts nothing; the count of roots must match.
    assert len(draft_trees(conditioned, hidden, [3], 0, 3)[0][0]) == 0
    with pytest.raises(ValueError, match="root tokens"):
        conditioned_trees(conditioned, hidden, [3, 4], 4, 2)


def test_plain_heads_draft_trees_the_way_propose_tree_does():
    heads = MedusaHeads.for_model(tiny_model("llama"), 3)
    with torch.no_grad():
        heads.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    got = draft_trees(heads, hidden, [1, 2], 8, 3)
    logits, _ = heads.candidates(hidden)
    for r in range(2):
        tree, scores = propose_tree(logits[:, r], max_nodes=8, top_k=3)
        assert got[r][0] == tree and got[r][1] == pytest.approx(scores)


def test_nodes_below_a_requests_floor_are_not_expanded(conditioned):
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    full = conditioned_trees(conditioned, hidden, [3, 9], max_nodes=40, top_k=3)
    tree, scores = full[0]
    assert max(tree.depths()) == 3
    # The best second-level node's score: the others at that level are not expanded.
    floor = max(s for s, d in zip(scores, tree.depths(), strict=True) if d == 2)
    cut = conditioned_trees(conditioned, hidden, [3, 9], max_nodes=40, top_k=3,
                            min_scores=[floor, 0.0])
    tree, scores = cut[0]
    for node in range(len(tree)):  # only nodes at or above the floor have children
        if tree.children(node):
            assert scores[node] >= floor
    assert len(tree) < len(full[0][0])
    # What was kept is what the full tree has for those paths; the other request is untouched.
    full_scores = dict(zip(_paths(full[0][0]), full[0][1], strict=True))
    for path, score in zip(_paths(tree), scores, strict=True):
        assert full_scores[path] == pytest.approx(score)
    assert cut[1][0] == full[1][0] and cut[1][1] == pytest.approx(full[1][1], rel=1e-4)
