"""Prefix-cache affinity: send a prompt where its prefix was sent before, unless that is busy.

Each decode worker's recent prompts are remembered as chained hashes of their leading blocks (the
same chaining a worker's block manager uses, so a shared hash means a shared cached prefix there).
A new prompt goes to the worker holding the longest run of its leading blocks, as long as that
worker has at most `slack` more requests in flight than the least loaded one; otherwise load wins.
The memory is approximate (bounded, least recently used first out): a wrong guess costs a cache
miss, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from baton.actors.block_manager import chain_hash


def prefix_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int) -> list[int]:
    """Chained hashes of the prompt's first full blocks (at most `max_blocks`)."""
    out: list[int] = []
    prev = None
    for i in range(min(len(token_ids) // block_size, max_blocks)):
        prev = chain_hash(prev, tuple(token_ids[i * block_size : (i + 1) * block_size]))
        out.append(prev)
    return out


class PrefixAffinity:
    """Which worker saw which prefix blocks last; one per dispatcher."""

    def __init__(self, block_size: int = 16, max_blocks: int = 256, capacity: int = 65536,
                 slack: int = 2):
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.capacity = capacity
        self.slack = slack
        self._owner: OrderedDict[int, Any] = OrderedDict()  # block hash -> worker
        self.hits = 0

    def choose(self, hashes: list[int], loads: dict[Any, int]) -> Any | None:
        """The worker to prefer for these prefix hashes among `loads` (None: no preference)."""
        if not hashes or not loads:
            return None
        best = None
        for h in hashes:  # the longest run of leading blocks one worker has seen
            owner = self._owner.get(h)
            if owner is None or owner not in loads or (best is not None and owner is not best):
                break
            best = owner
        if best is None or loads[best] > min(loads.values()) + self.slack:
            return None
        self.hits += 1
        return best

    def remember(self, hashes: list[int], worker: Any) -> None:
        for h in hashes:
            self._owner[h] = worker
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, worker: Any) -> None:
        for h in [h for h, w in self._owner.items() if w is worker]:
            del self._owner[h]
