"""Scheduler: token budget, chunked prefill, seat limit, preemption by recompute."""

from __future__ import annotations

from baton.actors.block_manager import BlockManager
from baton.actors.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from baton.actors.sequence import Sequence, SequenceStatus
from baton.sampling import SamplingParams


def make(num_blocks=64, block_size=4, seqs=8, budget=32) -> Scheduler:
    return Scheduler(SchedulerConfig(seqs, budget), BlockManager(num_blocks, block_size))


def add(s: Scheduler, rid: str, n: int) -> Sequence:
    q = Sequence(rid, list(range(1000, 1000 + n)), SamplingParams(max_tokens=64))
    s.add(q)
    return q


def finish_step(s: Scheduler, out: SchedulerOutput) -> None:
    """What the engine does after the model ran: advance, then append a token to the done."""
    s.update(out)
    for q in out.seqs:
        if q.num_computed_tokens == len(q):
            q.token_ids.append(7)


def test_budget_splits_long_prompts_into_chunks():
    s = make(budget=16)
    a = add(s, "a", 40)
    sizes = []
    while a.num_computed_tokens < 40:
        out = s.schedule()
        sizes.append(out.num_scheduled_tokens["a"])
        finish_step(s, out)
    assert sizes == [16, 16, 8]
    assert s.schedule().num_scheduled_tokens == {"a": 1}  # now decoding


def test_decodes_go_first_and_prefill_fills_the_rest():
    s = make(budget=10)
    a = add(s, "a", 3)
    finish_step(s, s.schedule())
    add(s, "b", 30)
    out = s.schedule()
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 9)]
    assert out.total_tokens == 10
    assert a.status is SequenceStatus.RUNNING


def test_seat_limit_holds_requests_back():
    s = make(seqs=2)
    for i in range(3):
        add(s, f"r{i}", 2)
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]
    assert [q.request_id for q in s.waiting] == ["r2"]


def test_preemption_frees_the_newest_and_requeues_it_first():
    s = make(num_blocks=4, block_size=4, budget=64)
    a = add(s, "a", 7)  # 2 blocks
    b = add(s, "b", 7)  # 2 blocks: cache now full
    finish_step(s, s.schedule())
    assert s.blocks.num_free_blocks == 0
    # Both now hold 8 tokens; the 9th of 'a' needs a third block: 'b' is preempted.
    finish_step(s, s.schedule())
    out = s.schedule()
    assert out.preempted == ["b"]
    assert list(out.num_scheduled_tokens) == ["a"] and len(a.block_table) == 3
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert b.num_computed_tokens == 0 and len(b) == 9  # its sampled token is kept
    assert s.waiting[0] is b and b.metrics.num_preemptions == 1
    assert s.blocks.violations(s.live()) == []


def test_finish_releases_blocks_from_any_state():
    s = make()
    a = add(s, "a", 10)
    b = add(s, "b", 10)
    finish_step(s, s.schedule())
    s.finish(a, "abort")
    w = add(s, "w", 4)
    s.finish(w, "abort")
    assert s.blocks.violations(s.live()) == []
    assert [q.request_id for q in s.live()] == ["b"]
    assert a.finish_reason == "abort" and a.block_table == []
    assert b.status is SequenceStatus.RUNNING
