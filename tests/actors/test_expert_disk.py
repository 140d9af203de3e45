"""The disk tier's files, direct and asynchronous reads, the caches' pinning of a layer's resident
experts, and the lookahead policy's per-layer eviction."""

from __future__ import annotations

import ctypes
import errno
import gc
import os

import pytest
import torch
from safetensors import safe_open

from baton.actors import expert_file
from baton.actors.expert_aio import open_aio
from baton.actors.expert_cache import ExpertCache
from baton.actors.expert_cache_aio import AioExpertCache
from baton.actors.expert_file import PAGE, page_buffer
from baton.actors.expert_policies import LRUPolicy
from baton.actors.expert_store import DiskStore, HostStore
from baton.actors.lookahead_policy import LookaheadPolicy


def _experts(num: int, inter: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num, 2 * inter, hidden, generator=gen).to(dtype),
            torch.randn(num, hidden, inter, generator=gen).to(dtype))


@pytest.mark.parametrize(("inter", "hidden", "dtype"), [
    (96, 64, torch.bfloat16),  # 36,864 bytes: exactly 9 pages, no padding
    (5, 7, torch.float32),  # 420 bytes: padded to a page
])
def test_layer_files_are_safetensors_with_page_aligned_expert_records(tmp_path, inter, hidden,
                                                                      dtype):
    gate_up, down = _experts(4, inter, hidden, dtype)
    store = DiskStore({3: (gate_up, down)}, tmp_path)
    path = tmp_path / "layer_3.safetensors"
    with safe_open(str(path), framework="pt") as f:
        for e in range(4):
            assert torch.equal(f.get_tensor(f"gate_up_proj.{e}"), gate_up[e])
            assert torch.equal(f.get_tensor(f"down_proj.{e}"), down[e])
    layout = store.reader.layout
    assert layout.data_start % PAGE == 0 and layout.record_bytes % PAGE == 0
    assert path.stat().st_size == layout.data_start + 4 * layout.record_bytes
    got_gate_up, got_down = torch.empty_like(gate_up[0]), torch.empty_like(down[0])
    for e in (2, 0, 3):
        store.read_into(3, e, got_gate_up, got_down)
        assert torch.equal(got_gate_up, gate_up[e]) and torch.equal(got_down, down[e])
        read_gate_up, read_down = store.read(3, e)
        assert torch.equal(read_gate_up, gate_up[e]) and torch.equal(read_down, down[e])
    store.close()


def test_reads_fall_back_to_the_page_cache_where_direct_io_is_refused(tmp_path, monkeypatch,
                                                                      caplog):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "O_DIRECT not supported here")
        return real_open(path, flags, *args)

    monkeypatch.setattr(expert_file.os, "open", no_direct)
    gate_up, down = _experts(3, 5, 7, torch.float32)
    store = DiskStore({0: (gate_up, down)}, tmp_path)
    assert not store.reader.direct
    assert "direct reads" in caplog.text and "page cache" in caplog.text
    got_gate_up, got_down = torch.empty_like(gate_up[0]), torch.empty_like(down[0])
    store.read_into(0, 1, got_gate_up, got_down)
    assert torch.equal(got_gate_up, gate_up[1]) and torch.equal(got_down, down[1])
    store.close()


def test_a_layers_resident_experts_are_not_evicted_by_its_own_misses():
    gate_up, down = _experts(4, 3, 5, torch.float32)
    store = HostStore({0: (gate_up, down)}, pin=False)
    cache = ExpertCache(store, capacity=2, device=torch.device("cpu"), policy=LRUPolicy())
    cache.release(cache.acquire(0, [0]))
    cache.release(cache.acquire(0, [1]))
    # Expert 0 is the least recent: a miss for 2 taken first would evict it, then miss it too.
    slots = cache.acquire(0, [2, 0])
    assert cache.stats.hits == 1 and cache.stats.misses == 3
    assert sorted(cache.resident()) == [(0, 0), (0, 2)]
    assert torch.equal(cache.gate_up[slots[0]], gate_up[2])
    assert torch.equal(cache.gate_up[slots[1]], gate_up[0])
    cache.release(slots)
    cache.close()


def _router(weights: list[list[float]]):
    w = torch.tensor(weights)
    return lambda hidden: hidden.reshape(-1, w.shape[1]) @ w.T


def test_lookahead_evicts_within_a_layer_at_its_share_else_from_the_layer_that_just_ran():
    # Three layers of four experts, six slots: a share of two per layer; top-2, so predictions of
    # three.
    routers = {i: _router([[0.0, 0.1], [0.0, 0.0], [0.0, 1.0], [0.0, 0.2]]) for i in range(3)}
    policy = LookaheadPolicy(routers, top_k=2, capacity=6, num_experts=4)
    assert policy.share == 2
    resident = [(0, 0), (1, 2), (1, 3), (2, 0), (2, 1), (2, 3)]
    for key in resident:
        policy.insert(key)
        policy.touch(key)
    policy.route(1, torch.tensor([[2]]))
    # Layer 2 is next. Its router picks experts 2 and 3; the best-ranked other makes three.
    predicted = policy.predict(1, torch.tensor([[0.0, 1.0]]))
    assert predicted == [(2, 2), (2, 3), (2, 0)]
    # Layer 2 holds more than its share: loading (2, 2) evicts its one expert not predicted.
    assert policy.victim(resident, (2, 2)) == (2, 1)
    # At its share with every resident expert predicted (spared), a layer takes from the fullest
    # layer whose next use is furthest away: layer 1 ran last, its experts wait a whole step.
    policy.forget((2, 1))
    resident.remove((2, 1))
    assert policy.victim(resident, (2, 2)) in [(1, 2), (1, 3)]


def test_lookahead_ranks_resident_experts_above_unread_ones_of_a_close_score():
    routers = {i: _router([[0.0, 0.1], [0.0, 0.0], [0.0, 1.0], [0.0, 0.2]]) for i in range(2)}
    policy = LookaheadPolicy(routers, top_k=1, capacity=4, num_experts=4)  # predicts two
    policy.insert((1, 1))
    # Experts 3 and 0 score above 1, but 1 is resident (no read): it ranks right after the pick.
    assert policy.predict(0, torch.tensor([[0.0, 1.0]])) == [(1, 2), (1, 1)]


def test_native_aio_reads_land_whole_where_asked_and_report_short_reads(tmp_path):
    aio = open_aio(depth=2)
    if aio is None:
        pytest.skip("no native AIO on this system")
    path = tmp_path / "records"
    path.write_bytes(b"".join(bytes([i]) * PAGE for i in range(3)))
    fd = os.open(path, os.O_RDONLY)
    buf, address = page_buffer(2 * PAGE)
    try:
        first, second = aio.submit([(fd, 2 * PAGE, address, PAGE),
                                    (fd, 0, address + PAGE, PAGE)])
        with pytest.raises(ValueError, match="1 reads asked for with 0 free"):
            aio.submit([(fd, PAGE, address, PAGE)])  # both are in flight
        done = aio.poll(wait_for=second)
        done.update(aio.poll(wait_for=first) if first not in done else {})
        assert done == {first: PAGE, second: PAGE}
        at = address - ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert buf[at : at + 2 * PAGE] == bytes([2]) * PAGE + bytes([0]) * PAGE
        [past_end] = aio.submit([(fd, 3 * PAGE, address, PAGE)])
        assert aio.poll(wait_for=past_end) == {past_end: 0}
        # A read the kernel refuses to start comes back from `poll` as a failed read.
        [refused] = aio.submit([(-1, 0, address, PAGE)])
        assert aio.poll(wait_for=refused) == {refused: -errno.EBADF}
    finally:
        aio.close()
        os.close(fd)


def test_an_aio_context_and_a_stores_files_are_freed_when_not_closed(tmp_path):
    gate_up, down = _experts(2, 5, 7, torch.float32)
    store = DiskStore({0: (gate_up, down)}, tmp_path)
    closers = [store._close_fds] + ([store._aio._destroy_ctx] if store._aio is not None else [])
    del store
    gc.collect()
    assert not any(closer.alive for closer in closers)


class FlakyDiskStore(DiskStore):
    """Reports the first asynchronous read of `bad` as failed, as a failing disk would."""

    def __init__(self, layers, directory, bad):
        super().__init__(layers, directory)
        self.bad, self.failed = bad, False
        self._tickets: dict[int, tuple[int, int]] = {}

    def begin_reads(self, reads):
        tickets = super().begin_reads(reads)
        for ticket, (layer, expert, _) in zip(tickets, reads, strict=True):
            self._tickets[ticket] = (layer, expert)
        return tickets

    def collect(self, wait_for=None):
        done = super().collect(wait_for)
        for ticket in done:
            if self._tickets.pop(ticket) == self.bad and not self.failed:
                self.failed, done[ticket] = True, False
        return done


@pytest.mark.parametrize("fail", [False, True])
def test_aio_cache_computes_ready_experts_first_and_rereads_a_failed_read(tmp_path, fail):
    gate_up, down = _experts(4, 3, 5, torch.float32)
    store = FlakyDiskStore({0: (gate_up, down)}, tmp_path, bad=(0, 2) if fail else None)
    if not store.async_reads:
        pytest.skip("no direct reads or native AIO here")
    cache = AioExpertCache(store, capacity=2, device=torch.device("cpu"), policy=LRUPolicy())
    [first] = cache.acquire(0, [1])
    cache.ready(first)
    cache.release([first])
    slots = cache.acquire(0, [2, 1])
    # Expert 1 was resident: readable now. Expert 2's read was only started.
    assert [cache.loading(s) for s in slots] == [True, False]
    assert torch.equal(cache.gate_up[slots[1]], gate_up[1])
    cache.ready(slots[0])
    assert not cache.loading(slots[0])
    assert torch.equal(cache.gate_up[slots[0]], gate_up[2])
    assert torch.equal(cache.down[slots[0]], down[2])
    assert store.failed == fail
    cache.release(slots)
    assert cache.stats.misses == 2 and cache.stats.hits == 1
    cache.close()
    store.close()


@pytest.fixture
def lru_aio_cache(tmp_path):
    """Builds an LRU `AioExpertCache` of `capacity` slots over 5 experts of one layer on disk:
    the cache and the experts."""
    gate_up, down = _experts(5, 3, 5, torch.float32)
    store = DiskStore({0: (gate_up, down)}, tmp_path)
    if not store.async_reads:
        pytest.skip("no direct reads or native AIO here")
    caches = []

    def build(capacity: int):
        caches.append(AioExpertCache(store, capacity=capacity, device=torch.device("cpu"),
                                     policy=LRUPolicy()))
        return caches[-1], gate_up, down

    yield build
    for cache in caches:
        cache.close()
    store.close()


def _use(cache: ExpertCache, experts: list[int]) -> list[int]:
    """Acquire layer 0's `experts`, wait for them and release them: their slots."""
    slots = cache.acquire(0, experts)
    for slot in slots:
        cache.ready(slot)
    cache.release(slots)
    return slots


def test_aio_cache_counts_hits_on_resident_experts_and_evicts_by_their_use(lru_aio_cache):
    cache, gate_up, _ = lru_aio_cache(2)
    for expert in (0, 1, 0):  # 0 and 1 are read; the second use of 0 finds it resident
        _use(cache, [expert])
    [slot] = _use(cache, [2])  # a miss: 1 is the least recently used now
    assert sorted(cache.resident()) == [(0, 0), (0, 2)]
    assert torch.equal(cache.gate_up[slot], gate_up[2])
    assert (cache.stats.hits, cache.stats.misses) == (1, 3)
    assert cache.uses[(0, 0)] == 2


def test_aio_prefetch_evicts_by_uses_that_found_experts_resident(lru_aio_cache):
    cache, _, down = lru_aio_cache(2)
    for expert in (0, 1, 0):
        _use(cache, [expert])
    cache.prefetch([(0, 2)])
    assert sorted(cache.resident()) == [(0, 0), (0, 2)]
    [slot] = _use(cache, [2])
    assert torch.equal(cache.down[slot], down[2])
    assert cache.stats.prefetches_used == 1


def test_aio_cache_keeps_the_order_of_uses_across_fast_and_general_acquires(lru_aio_cache):
    cache, _, _ = lru_aio_cache(3)
    # 0 is used again while resident; then 1 (resident) with 3 (a miss that evicts 2).
    for experts in ([0], [1], [2], [0], [1, 3]):
        _use(cache, experts)
    _use(cache, [4])  # uses, oldest first: 0, 1, 3: 0 goes
    assert sorted(cache.resident()) == [(0, 1), (0, 3), (0, 4)]


def test_aio_cache_settles_a_layer_only_when_nothing_can_load_or_evict_meanwhile(lru_aio_cache):
    cache, gate_up, _ = lru_aio_cache(3)
    _use(cache, [0, 1])
    before = cache.stats.hits
    slots = cache.settled(0, [1, 0], [(0, 1)])
    assert slots is not None and torch.equal(cache.gate_up[slots[0]], gate_up[1])
    assert cache.stats.hits == before + 2 and cache.uses[(0, 1)] == 2  # counted as hits
    # Nothing pinned: both stay evictable (a pin would keep 0 and 1 and refuse the read).
    assert cache.settled(0, [2], []) is None  # not resident: it must be acquired and read
    assert cache.settled(0, [0], [(0, 3)]) is None  # a prefetch to start: acquire, then prefetch
    cache.prefetch([(0, 2)])
    assert cache.settled(0, [0], []) is None  # a read in flight: collected by the general path
    _use(cache, [2])
    for expert in (3, 4):  # two misses: 0 and 1 go, as they would had they never been settled
        _use(cache, [expert])
    assert sorted(cache.resident()) == [(0, 2), (0, 3), (0, 4)]
