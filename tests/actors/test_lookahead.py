"""Lookahead tries: what they draft, in what order, within what size, and what they remember."""

from __future__ import annotations

import random

import pytest

from baton.actors.draft_tree import DraftTree
from baton.actors.lookahead import LookaheadProposer
from baton.actors.token_trie import TokenTrie
from baton.errors import ConfigError, InvalidRequestError, RequestNotFoundError


def paths(draft: DraftTree) -> list[list[int]]:
    """Each node's tokens from the root down to it."""
    out: list[list[int]] = []
    for tok, parent in zip(draft.tokens, draft.parents, strict=True):
        out.append((out[parent] if parent >= 0 else []) + [tok])
    return out


def occurs(needle: list[int], text: list[int]) -> bool:
    n = len(needle)
    return any(text[i : i + n] == needle for i in range(len(text) - n + 1))


def root_tokens(draft: DraftTree) -> list[int]:
    return [draft.tokens[i] for i in draft.children(-1)]


def test_a_span_repeated_from_the_prompt_is_drafted_as_one_chain():
    span = [101, 102, 103, 104, 105, 106, 107, 108, 109, 110]
    prompt = [1, 2, 3, *span, 4, 5, 6, 7]
    trie = TokenTrie(branch_length=8, max_match=3)
    trie.insert(prompt)
    draft = trie.retrieve([9, 9, 101, 102, 103], max_nodes=16)
    assert draft is not None and draft.is_chain and draft.probs is None
    assert draft.tokens == span[3:] + [4, 5, 6, 7]
    assert trie.retrieve([9, 9, 101, 102, 103], max_nodes=5).tokens == span[3:8]


def test_a_chain_goes_on_past_branch_length_from_its_own_last_tokens():
    span = list(range(101, 131))
    trie = TokenTrie(branch_length=4, max_match=3)  # paths of at most 7 tokens are stored
    trie.insert([1, 2, *span, 3])
    draft = trie.retrieve([101, 102], max_nodes=40)
    assert draft.tokens == span[2:] + [3]
    assert trie.violations() == []


def test_several_continuations_branch_in_order_of_frequency():
    # After [7, 8]: 30 three times, 20 twice, 10 once (seen last); below 30: 31 twice, 32 once.
    text = [7, 8, 30, 31, 0, 7, 8, 30, 31, 0, 7, 8, 30, 32, 0, 7, 8, 20, 0, 7, 8, 20, 0, 7, 8, 10]
    trie = TokenTrie(branch_length=4, max_match=2)
    trie.insert(text)
    draft = trie.retrieve([5, 7, 8], max_nodes=32)
    assert draft is not None
    assert root_tokens(draft) == [30, 20, 10]
    first = draft.tokens.index(30)
    assert [draft.tokens[i] for i in draft.children(first)] == [31, 32]
    # The best nodes come first: a budget of 3 keeps 30, 20, 31 (31 outranks 10).
    small = trie.retrieve([5, 7, 8], max_nodes=3)
    assert small is not None and sorted(paths(small)) == [[20], [30], [30, 31]]
    assert trie.retrieve([5, 7, 8], max_nodes=1).tokens == [30]


def test_the_longest_matching_suffix_decides_the_draft():
    # After 5 alone, 6 is most frequent; after [4, 5] it was always 9.
    text = [5, 6, 1, 5, 6, 2, 5, 6, 3, 4, 5, 9, 8]
    trie = TokenTrie(branch_length=4, max_match=3)
    trie.insert(text)
    assert trie.retrieve([0, 4, 5], max_nodes=1).tokens == [9]
    assert trie.retrieve([0, 3, 5], max_nodes=1).tokens == [6]


def test_drafts_are_real_continuations_within_size():
    rng = random.Random(0)
    text = [rng.randrange(6) for _ in range(2000)]  # a small vocabulary: many branches
    trie = TokenTrie(branch_length=5, max_match=3)
    trie.insert(text)
    assert trie.violations() == []
    for max_nodes in (1, 2, 7, 40):
        for _ in range(30):
            ctx = [rng.randrange(6) for _ in range(5)]
            m = trie.match_length(ctx)
            draft = trie.retrieve(ctx, max_nodes)
            assert draft is not None and 1 <= len(draft) <= max_nodes
            for p in paths(draft):
                # Within branch_length the path follows the match; deeper, each token follows
                # the path's own last max_match tokens.
                assert occurs(ctx[-m:] + p if len(p) <= 5 else p[-4:], text)
            assert len({tuple(p) for p in paths(draft)}) == len(draft)  # no node twice


def test_no_match_gives_none():
    trie = TokenTrie(branch_length=4, max_match=2)
    trie.insert([1, 2, 3, 4])
    assert trie.retrieve([9], max_nodes=8) is None  # 9 never seen
    assert trie.retrieve([4], max_nodes=8) is None  # seen, but nothing ever followed it
    assert trie.retrieve([], max_nodes=8) is None
    assert trie.retrieve([2], max_nodes=0) is None


def test_counting_a_stream_in_pieces_equals_counting_it_whole():
    # 70 follows 50 twice, 60 once; 60 starts a long run, so recounting open paths would favour it.
    text = [50, 60, 1, 2, 3, 4, 5, 50, 70, 9, 50, 70, 9]
    whole = TokenTrie(branch_length=6, max_match=2)
    whole.insert(text)
    pieces = TokenTrie(branch_length=6, max_match=2)
    writer = pieces.writer()
    for i in range(0, len(text), 2):
        writer.extend(text[i : i + 2])
    assert pieces.violations() == [] and pieces.size == whole.size
    for trie in (whole, pieces):
        assert root_tokens(trie.retrieve([50], max_nodes=8)) == [70, 60]
    rng = random.Random(1)
    for _ in range(50):
        ctx = [rng.choice(text) for _ in range(3)]
        assert whole.retrieve(ctx, 10) == pieces.retrieve(ctx, 10)


def test_a_bounded_trie_keeps_what_is_frequent_within_capacity():
    rng = random.Random(2)
    phrase = [900, 901, 902, 903, 904, 905]
    trie = TokenTrie(branch_length=4, max_match=2, capacity=400)
    writer = trie.writer()
    for _ in range(60):
        writer.extend([rng.randrange(500) for _ in range(20)] + phrase)
        assert trie.size <= 400
    assert trie.violations() == []
    assert trie.retrieve([900, 901], max_nodes=4).tokens == [902, 903, 904, 905]
    # Noise seen once is mostly gone: 60 * 26 tokens would make thousands of nodes unbounded.
    unbounded = TokenTrie(branch_length=4, max_match=2)
    unbounded.insert([rng.randrange(500) for _ in range(60 * 20)])
    assert unbounded.size > 4 * 400


def test_the_shared_trie_learns_outputs_across_requests():
    prop = LookaheadProposer(branch_length=6, max_match=2)
    answer = [300, 301, 302, 303, 304, 305, 306]
    secret = [700, 701, 702, 703]
    prop.start("a", [1, 2, *secret, 3])
    prop.extend("a", answer[:3])
    prop.extend("a", answer[3:])
    prop.finish("a")
    prop.start("b", [5, 6, 7])
    draft = prop.propose("b", [5, 6, 7, 300, 301], max_nodes=8)
    assert draft is not None and draft.tokens == answer[2:]
    # The prompt of "a" stayed with "a": only outputs (and a prompt's last tokens) are shared.
    assert prop.propose("b", [5, 6, 7, 700, 701], max_nodes=8) is None
    # A prompt's last tokens are shared, so "b" learns how outputs begin after [2, ..., 3].
    assert prop.propose("b", [703, 3], max_nodes=1).tokens == [300]


def test_forgetting_the_shared_trie_drops_what_earlier_requests_generated():
    prop = LookaheadProposer(branch_length=6, max_match=2)
    answer = [300, 301, 302, 303, 304, 305]
    prop.start("a", [1, 2, 3])
    prop.extend("a", answer)
    prop.finish("a")
    prop.start("open", [9, 9])  # in flight across the reset: it feeds the new shared trie
    prop.forget_shared()
    prop.start("b", [5, 6, 7])
    assert prop.propose("b", [5, 6, 7, 300, 301], max_nodes=8) is None
    prop.extend("open", [400, 401, 402, 403])
    draft = prop.propose("b", [5, 400, 401], max_nodes=8)
    assert draft is not None and draft.tokens == [402, 403]


def test_the_shared_trie_stays_within_capacity_across_many_requests():
    rng = random.Random(3)
    prop = LookaheadProposer(branch_length=6, max_match=2, shared_capacity=1000)
    common = [800, 801, 802, 803, 804]
    for i in range(40):
        rid = f"r{i}"
        prop.start(rid, [rng.randrange(1000) for _ in range(30)])
        for _ in range(5):
            prop.extend(rid, [rng.randrange(1000) for _ in range(8)])
            assert prop.shared.size <= 1000
        prop.extend(rid, common)
        if i % 3:
            prop.finish(rid)  # some stay open while others prune: their writers must cope
    assert prop.shared.violations() == []
    prop.start("new", [1])
    assert prop.propose("new", [1, 800, 801], max_nodes=3).tokens == [802, 803, 804]


def test_the_request_trie_is_preferred_at_equal_match_length():
    prop = LookaheadProposer(branch_length=4, max_match=2)
    prop.start("a", [0])
    prop.extend("a", [10, 11, 20, 20, 10, 11, 20, 20, 10, 11, 20, 20])  # shared: 10 11 -> 20
    prop.finish("a")
    prop.start("b", [10, 11, 40, 41])  # own: 10 11 -> 40
    assert prop.propose("b", [10, 11], max_nodes=1).tokens == [40]
    both = prop.propose("b", [10, 11], max_nodes=8)
    assert both.tokens[:2] == [40, 41] and root_tokens(both) == [40, 20]


def test_leftover_room_is_filled_from_shorter_matches():
    prop = LookaheadProposer(branch_length=8, max_match=2)
    prop.start("r", [5, 6, 7, 0, 6, 8, 0, 6, 9])
    draft = prop.propose("r", [5, 6], max_nodes=16)
    # [5, 6] was followed by 7 0 6 8 0 6 9; 6 alone also by 8 and 9, which fill the room after.
    assert draft.tokens[:7] == [7, 0, 6, 8, 0, 6, 9] and sorted(root_tokens(draft)) == [7, 8, 9]
    assert prop.propose("r", [5, 6], max_nodes=1).tokens == [7]


def test_propose_gives_none_without_a_match():
    prop = LookaheadProposer()
    prop.start("r", [1, 2, 3, 4])
    assert prop.propose("r", [1, 2, 3, 4], max_nodes=8) is None
    assert prop.propose("r", [7, 1], max_nodes=8).tokens[0] == 2
    assert prop.propose("r", [7, 1], max_nodes=0) is None


def test_finish_drops_the_request():
    prop = LookaheadProposer()
    prop.start("r", [1, 2, 3, 1, 2])
    assert "r" in prop and len(prop) == 1
    prop.finish("r")
    assert "r" not in prop and len(prop) == 0
    prop.finish("r")  # twice, or for an id never started: no error
    with pytest.raises(RequestNotFoundError):
        prop.propose("r", [1, 2], max_nodes=4)
    with pytest.raises(RequestNotFoundError):
        prop.extend("r", [3])


def test_bad_use_raises_typed_errors():
    prop = LookaheadProposer()
    prop.start("r", [1])
    with pytest.raises(InvalidRequestError):
        prop.start("r", [1])
    with pytest.raises(ConfigError):
        LookaheadProposer(branch_length=0)
    with pytest.raises(ConfigError):
        LookaheadProposer(shared_capacity=0)
