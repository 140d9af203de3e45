"""Continuous batching: which requests run how many tokens this step.

One shape for every kind of step (vLLM v1): `schedule()` returns `{request_id: num_tokens}` in
batch order, whether a request is in a prompt chunk, decoding one token, or (later) verifying
several draft tokens. Running requests go first; a long prompt is split into chunks that fit the
step's token budget; when KV blocks run out the most recently admitted request is preempted and
recomputed later (its blocks freed, its tokens kept).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from baton.actors.block_manager import BlockManager
from baton.actors.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    # Longest slice of one prompt per step; the rest of the budget stays for other requests.
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(slots=True)
class SchedulerOutput:
    """The batch of one step: requests in order, with how many tokens each runs."""

    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    seqs: list[Sequence] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    """Owns the waiting and running queues; the engine calls `schedule`, then `update`."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Start decoding a sequence whose prompt KV is already in its blocks (a handoff)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def live(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunk_cap = self.config.long_prefill_token_threshold or budget

        # 1. Running requests: decodes and unfinished prompt chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.draft is not None and seq.num_uncomputed_tokens > min(budget, chunk_cap):
                seq.drop_draft()  # a draft is verified whole or not at all
            n = min(seq.num_uncomputed_tokens, budget, chunk_cap)
            while not self.blocks.allocate_slots(seq, n):
                victim = self.running.pop()  # most recently admitted
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                out.num_scheduled_tokens[seq.request_id] = n
                out.seqs.append(seq)
                budget -= n
                i += 1
                continue
            break  # `seq` itself was preempted: nothing after it is left to schedule

        # 2. Waiting requests, in arrival order, while budget, seats and blocks last.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if out.preempted:
                break  # blocks are short this step; let the running ones finish first
            seq = self.waiting[0]
            cached = self.blocks.match_prefix(seq) if not seq.block_table else []
            num_cached = len(cached) * self.blocks.block_size
            n = min(len(seq) - seq.num_computed_tokens - num_cached, budget, chunk_cap)
            if not self.blocks.allocate_slots(seq, n, cached):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled is None:
                seq.metrics.first_scheduled = time.monotonic()
            self.running.append(seq)
            out.num_scheduled_tokens[seq.request_id] = n
            out.seqs.append(seq)
            budget -= n
        return out

    def update(self, out: SchedulerOutput) -> None:
        """Advance computed counts after the model ran the step, and publish full blocks."""
        for seq in out.seqs:
            if seq.is_finished:
                continue
            seq.num_computed_tokens += out.num_scheduled_tokens[seq.request_id]
            if seq.draft is None:  # a verified draft's blocks are committed once it is settled
                self.blocks.commit(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (any state) and free its blocks."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.metrics.finished = time.monotonic()
        seq.drop_draft()
        self.blocks.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        seq.drop_draft()
        self.blocks.free(seq)
        seq.draft_kv_len = 0
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.waiting.appendleft(seq)
