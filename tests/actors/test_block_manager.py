"""BlockManager: ref counts, prefix sharing, eviction order, all-or-nothing allocation."""

from __future__ import annotations

from baton.actors.block_manager import BlockManager
from baton.actors.sequence import Sequence
from baton.sampling import SamplingParams


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=8))


def admit(bm: BlockManager, s: Sequence) -> bool:
    cached = bm.match_prefix(s)
    n = len(s) - len(cached) * bm.block_size
    ok = bm.allocate_slots(s, n, cached)
    if ok:
        s.num_computed_tokens += n
        bm.commit(s)
    return ok


def test_identical_prefixes_share_blocks_and_free_cleanly():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq("a", list(range(10)))  # 2 full blocks + 2 tokens
    b = seq("b", list(range(8)) + [77, 78, 79])
    assert admit(bm, a) and admit(bm, b)
    assert a.block_table[:2] == b.block_table[:2]
    assert a.block_table[2] != b.block_table[2]
    assert b.num_computed_tokens == 11 and b.metrics.num_cached_tokens == 8
    assert bm.num_free_blocks == 10 - 4
    assert bm.violations([a, b]) == []
    bm.free(a)
    assert bm.violations([b]) == []
    bm.free(b)
    assert bm.violations([]) == [] and bm.num_free_blocks == 10


def test_last_prompt_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq("a", list(range(8)))
    assert admit(bm, a)
    bm.free(a)
    again = seq("again", list(range(8)))
    cached = bm.match_prefix(again)
    assert len(cached) == 1  # block 2 holds the last token: it must be recomputed for logits


def test_freed_prefix_survives_until_its_blocks_are_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", list(range(9)))
    assert admit(bm, a)
    bm.free(a)
    assert len(bm.match_prefix(seq("x", list(range(9))))) == 2
    # Filling the cache with other content evicts the head blocks last.
    other = seq("o", [100 + i for i in range(5)])
    assert admit(bm, other)
    assert len(bm.match_prefix(seq("y", list(range(9))))) == 2
    bm.free(other)
    big = seq("big", [200 + i for i in range(16)])
    assert admit(bm, big)
    assert bm.match_prefix(seq("z", list(range(9)))) == []
    bm.free(big)
    assert bm.violations([]) == []


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq("a", list(range(8)))
    assert admit(bm, a)
    b = seq("b", [50 + i for i in range(9)])  # needs 3 blocks, 1 free
    table_before = list(b.block_table)
    assert not bm.allocate_slots(b, len(b))
    assert b.block_table == table_before and bm.num_free_blocks == 1
    assert bm.violations([a]) == []


def test_violations_detect_a_leak():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", list(range(6)))
    assert admit(bm, a)
    # Forget the sequence without freeing: its blocks are owned by nobody live.
    problems = bm.violations([])
    assert problems and "owned by 0" in problems[0]


def test_decode_growth_crosses_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(4)))
    assert admit(bm, a)
    for t in range(9):
        a.token_ids.append(300 + t)
        assert bm.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        bm.commit(a)
    assert len(a.block_table) == bm.blocks_needed(len(a)) == 4
    assert bm.violations([a]) == []
