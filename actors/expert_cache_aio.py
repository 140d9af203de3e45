"""The expert cache on a CPU over a store with asynchronous reads (the disk tier's native AIO).

No loader thread: the forward thread itself starts a prefetch's reads (`store.begin_read`) and
collects finished ones whenever it enters the cache, copying each into its slot. While a read is
in flight no thread runs for it, so nothing competes with the forward's intra-op threads for the
cores (see `expert_aio`). `acquire` only starts a layer's misses, together, so they overlap on the
disk; the forward computes the experts that are ready first and waits for a slot (`ready`) only
when it gets to it. Every method runs on the forward thread; the lock only keeps the
counters consistent for readers on other threads.
"""

from __future__ import annotations

import time

from baton.actors.expert_cache import ExpertCache, _Load, _Pending
from baton.actors.expert_policies import ExpertKey
from baton.errors import EngineError


class AioExpertCache(ExpertCache):
    """`ExpertCache` whose loads are reads the forward starts and collects itself."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.device.type != "cpu" or not self.store.async_reads:
            raise EngineError("AioExpertCache needs a CPU device and a store with async reads")
        self._in_flight: dict[int, _Pending] = {}  # ticket -> the load it fills
        self._unready: dict[int, _Pending] = {}  # acquired slots whose load may be in flight

    def prefetch(self, keys: list[ExpertKey]) -> None:
        """Start reading `keys` now (those resident are skipped), as many as reads and slots
        allow; unlike a queued prediction, a started read is not taken back."""
        slot_of = self._slot_of  # only this thread changes it
        if not self._in_flight and all(key in slot_of for key in keys):
            return  # nothing to read, nothing to collect
        with self._cond:
            if self._closed:
                return
            self._collect()
            for key in keys:
                if len(self._in_flight) >= self.store.read_slots:
                    break
                if key in self._slot_of:
                    continue
                reserved = self._reserve(key, wait=False)
                if reserved is None:
                    break  # every slot is pinned or loading
                slot, load = reserved
                self._start(slot, key, load)
                self._prefetched.add(key)
                self.stats.prefetches_issued += 1

    def idle(self) -> bool:
        with self._cond:
            self._collect()
            return not self._in_flight

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._in_flight:
                self._collect(next(iter(self._in_flight)))
        super().close()

    def loading(self, slot: int) -> bool:
        return slot in self._unready

    def ready(self, slot: int) -> None:
        pending = self._unready.pop(slot, None)
        if pending is None:
            return
        _, key, load = pending
        t0 = time.perf_counter()
        while not load.issued.is_set():
            with self._cond:
                self._collect(load.ticket)
        if load.failed:
            self._reload(slot, key)
        with self._cond:
            self.stats.stall_seconds += time.perf_counter() - t0

    def release(self, slots: list[int]) -> None:
        for slot in slots:  # released unread (the forward failed): its load completes anyway
            self._unready.pop(slot, None)
        super().release(slots)

    # -- inside -----------------------------------------------------------------------------------

    def _fill(self, misses: list[_Pending], waits: list[_Pending]) -> None:
        """Start `misses`; both they and `waits` are waited for in `ready`."""
        with self._cond:
            for slot, key, load in misses:
                while len(self._in_flight) >= self.store.read_slots:
                    self._collect(next(iter(self._in_flight)))
                self._start(slot, key, load)
        for pending in misses + waits:
            self._unready[pending[0]] = pending

    def _start(self, slot: int, key: ExpertKey, load: _Load) -> None:
        """Begin reading `key` for `slot`. Holds `_cond`."""
        ticket = self.store.begin_read(*key)
        if ticket is None:  # the store has fewer reads to give than it said
            raise EngineError(f"the expert store refused a read of {key} with "
                              f"{len(self._in_flight)} in flight")
        load.ticket = ticket
        self._in_flight[ticket] = (slot, key, load)

    def _collect(self, wait_for: int | None = None) -> None:
        """Copy finished reads into their slots (waiting for `wait_for`'s, when given) and mark
        them ready; a failed one marks its load failed. Holds `_cond`."""
        for ticket, ok in self.store.collect(wait_for).items():
            slot, key, load = self._in_flight.pop(ticket)
            if ok:
                self.store.finish_read(ticket, self.gate_up[slot], self.down[slot])
                self._loaded(slot, key, load)
            else:
                self.store.finish_read(ticket, None, None)
                self._evict_failed(slot, key, load)
        self._cond.notify_all()

    def _wait_for_slot(self, timeout: float) -> bool:
        if self._in_flight:  # a read finishing frees its slot for eviction
            self._collect(next(iter(self._in_flight)))
            return True
        return self._cond.wait(timeout)
