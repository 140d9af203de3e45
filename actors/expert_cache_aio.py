"""The expert cache on a CPU over a store with asynchronous reads (the disk tier's native AIO).

No loader thread: the forward thread itself starts a prefetch's reads (`store.begin_reads`, all
of one call in one system call) and collects finished ones whenever it enters the cache. The
slots are laid out as the store's records (`store.slots`), so the disk writes each expert into
its slot and nothing is copied. While a read is in flight no thread runs for it, so nothing
competes with the forward's intra-op threads for the cores (see `expert_aio`).

`acquire` only starts a layer's misses, together, so they overlap on the disk; the forward
computes the experts that are ready first and waits for a slot (`ready`) only when it gets to
it. Every method runs on the forward thread; the lock only keeps the counters consistent for
readers on other threads.
"""

from __future__ import annotations

import time

import torch

from baton.actors.expert_cache import ExpertCache
from baton.actors.expert_loads import Load, Pending
from baton.actors.expert_policies import ExpertKey, ExpertPolicy
from baton.actors.expert_store import ExpertStore
from baton.errors import EngineError


class AioExpertCache(ExpertCache):
    """`ExpertCache` whose loads are reads the forward starts and collects itself."""

    def __init__(self, store: ExpertStore, capacity: int, device: torch.device,
                 policy: ExpertPolicy) -> None:
        if device.type != "cpu" or not store.async_reads:
            raise EngineError("AioExpertCache needs a CPU device and a store with async reads")
        super().__init__(store, capacity, device, policy)
        self._in_flight: dict[int, Pending] = {}  # ticket -> the load it fills
        self._unready: dict[int, Pending] = {}  # acquired slots whose load may be in flight

    def acquire(self, layer: int, experts: list[int]) -> list[int]:
        """As `ExpertCache.acquire`. When every expert is resident and read (most layers), it
        only pins their slots and logs the hits; they are counted, and the policy told, before
        anything reads the counters or picks a victim."""
        keys = [(layer, e) for e in experts]
        with self._cond:
            slots = self._read_slots(keys) if len(keys) <= self.capacity else None
            if slots is not None:
                pins, idle = self._pins, self._idle
                for key, slot in zip(keys, slots, strict=True):
                    pins[slot] += 1
                    idle.pop(key, None)  # pinned: not evictable
                self._hit_log.append(keys)
                return slots
        return super().acquire(layer, experts)

    def settled(self, layer: int, experts: list[int], coming: list[ExpertKey]
                ) -> list[int] | None:
        """As `ExpertCache.settled`: here only this thread evicts (in `acquire` and `prefetch`),
        so with nothing to load and no read to collect, a layer's slots stay as they are."""
        if self._in_flight or len(experts) > self.capacity:
            return None
        keys = [(layer, e) for e in experts]
        slots = self._read_slots(keys)
        if slots is None or any(key not in self._slot_of for key in coming):
            return None
        with self._cond:
            self._hit_log.append(keys)
        return slots

    def _read_slots(self, keys: list[ExpertKey]) -> list[int] | None:
        """The slots of `keys` when every one is resident and read; None otherwise."""
        slot_of, loads = self._slot_of, self._load
        slots = []
        for key in keys:
            slot = slot_of.get(key)
            if slot is None or loads[slot] is not None:
                return None
            slots.append(slot)
        return slots

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
            starts: list[Pending] = []
            room = self.store.read_slots - len(self._in_flight)
            for key in keys:
                if len(starts) >= room:
                    break
                if key in self._slot_of:
                    continue
                reserved = self._reserve(key, wait=False)
                if reserved is None:
                    break  # every slot is pinned or loading
                slot, load = reserved
                starts.append((slot, key, load))
                self._prefetched.add(key)
                self._stats.prefetches_issued += 1
            self._start(starts)

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

    def loading_among(self, slots: list[int]) -> set[int]:
        return {slot for slot in slots if slot in self._unready}

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
            self._stats.stall_seconds += time.perf_counter() - t0

    def release(self, slots: list[int]) -> None:
        with self._cond:  # no other thread waits for a slot here: nothing to notify
            for slot in slots:
                self._unready.pop(slot, None)  # released unread (the forward failed)
            self._unpin(slots)

    # -- inside -----------------------------------------------------------------------------------

    def _new_load(self) -> Load:
        return Load(threads=False)  # this thread alone starts, collects and waits for reads

    def _slot_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.slots(self.capacity)

    def _fill(self, misses: list[Pending], waits: list[Pending]) -> None:
        """Start `misses`; both they and `waits` are waited for in `ready`."""
        with self._cond:
            while misses:
                room = self.store.read_slots - len(self._in_flight)
                if not room:
                    self._collect(next(iter(self._in_flight)))
                    continue
                self._start(misses[:room])
                for pending in misses[:room]:
                    self._unready[pending[0]] = pending
                misses = misses[room:]
        for pending in waits:
            self._unready[pending[0]] = pending

    def _start(self, starts: list[Pending]) -> None:
        """Begin reading each expert straight into its slot. Holds `_cond`."""
        if not starts:
            return
        tickets = self.store.begin_reads([(*key, self.gate_up[slot]) for slot, key, _ in starts])
        for ticket, pending in zip(tickets, starts, strict=True):
            pending[2].ticket = ticket
            self._in_flight[ticket] = pending

    def _collect(self, wait_for: int | None = None) -> None:
        """Mark finished reads' slots ready (waiting for `wait_for`'s, when given); a failed one
        marks its load failed. Holds `_cond`."""
        for ticket, ok in self.store.collect(wait_for).items():
            slot, key, load = self._in_flight.pop(ticket)
            if ok:
                self._loaded(slot, key, load)
            else:
                self._evict_failed(slot, key, load)
        self._cond.notify_all()

    def _wait_for_slot(self, timeout: float) -> bool:
        if self._in_flight:  # a read finishing frees its slot for eviction
            self._collect(next(iter(self._in_flight)))
            return True
        return self._cond.wait(timeout)
