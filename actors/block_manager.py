"""Paged KV block allocation: reference counts, prefix hashing, and the leak invariant.

A block is either free (reference count 0, in the free queue) or owned (count equal to the number
of live sequences whose block table holds it). Full blocks are named by a chained hash of every
token up to their end, so two prompts that share a prefix share its blocks. A freed block keeps its
hash until it is handed out again, so a finished request's prefix can still be hit (LRU eviction:
blocks are handed out oldest-freed first, and a sequence frees its tail before its head).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from baton.actors.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(prev: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev, token_ids))


class BlockManager:
    """Owns every KV block id; the scheduler calls it, the model runner only reads block tables."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- scheduler side ---------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq` (no side effects).

        The last token is never served from cache: its logits are needed to sample.
        """
        if not self.enable_prefix_caching:
            return []
        self._hash_full_blocks(seq, len(seq) - 1)
        hits: list[int] = []
        for i, h in enumerate(seq.block_hashes):
            if (i + 1) * self.block_size > len(seq) - 1:
                break
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            want = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block.token_ids != want:  # hash collision: treat as a miss
                break
            hits.append(block_id)
        return hits

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None
    ) -> bool:
        """Make `seq`'s block table cover its computed tokens plus `num_new_tokens`.

        `cached_blocks` (from `match_prefix`, only for a sequence with an empty table) are taken
        first and advance `num_computed_tokens`. All or nothing: False leaves everything unchanged.
        """
        cached = cached_blocks or []
        if cached and seq.block_table:
            raise ValueError("cached blocks can only start an empty block table")
        num_computed = seq.num_computed_tokens + len(cached) * self.block_size
        held = len(seq.block_table) + len(cached)
        need = self.blocks_needed(num_computed + num_new_tokens) - held
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if max(need, 0) + revived > len(self._free):
            return False
        if cached:
            self.prefix_queries += len(seq) - 1
            self.prefix_hits += len(cached) * self.block_size
            for block_id in cached:
                self._take(block_id)
            seq.block_table.extend(cached)
            seq.num_computed_tokens = num_computed
            seq.metrics.num_cached_tokens = num_computed
        elif not seq.block_table and self.enable_prefix_caching:
            self.prefix_queries += len(seq) - 1
        for _ in range(max(need, 0)):
            block_id = next(iter(self._free))
            self._take(block_id)
            block = self.blocks[block_id]
            if block.hash is not None and self._by_hash.get(block.hash) == block_id:
                del self._by_hash[block.hash]  # evict its old contents
            block.hash, block.token_ids = None, ()
            seq.block_table.append(block_id)
        return True

    def commit(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that became full, once their KV has been computed."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        self._hash_full_blocks(seq, num_full * self.block_size)
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            h = seq.block_hashes[i]
            block.hash = h
            block.token_ids = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            self._by_hash.setdefault(h, block.block_id)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release `seq`'s blocks past those `num_tokens` positions need (rejected drafts)."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def free(self, seq: Sequence) -> None:
        """Release every block `seq` holds; its tail goes to the free queue first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    # -- checks -----------------------------------------------------------------------------------

    def violations(self, live: Iterable[Sequence]) -> list[str]:
        """Every way the 'each block is free or owned' invariant fails (empty when it holds)."""
        owners: Counter[int] = Counter()
        for seq in live:
            owners.update(seq.block_table)
        problems = []
        for block in self.blocks:
            want = owners.get(block.block_id, 0)
            if block.ref_count != want:
                problems.append(
                    f"block {block.block_id}: ref_count {block.ref_count}, owned by {want}"
                )
            if (block.ref_count == 0) != (block.block_id in self._free):
                problems.append(f"block {block.block_id}: ref_count {block.ref_count} but "
                                f"{'in' if block.block_id in self._free else 'not in'} free queue")
        for h, block_id in self._by_hash.items():
            if self.blocks[block_id].hash != h:
                problems.append(f"hash index points at block {block_id} with another hash")
        return problems

    # -- internals --------------------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _hash_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            prev = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(chain_hash(prev, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
