"""The device-side expert cache: a fixed pool of expert slots under a byte budget.

The forward pass `acquire`s the experts a layer needs (a hit uses the resident copy, a miss loads
it synchronously from the store), computes from the slots, and `release`s them. `prefetch` queues
experts that a policy expects soon; a background thread loads them (on CUDA it issues the copies
on a side stream, so they overlap with compute; on a CPU it reads into the slot on its own
thread, without the GIL or the forward's intra-op threads). A slot is never evicted while
acquired, nor while its load is in flight. The pool is allocated once: resident bytes can never
exceed the budget.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque

import torch

from baton.actors.expert_loads import ExpertCacheStats, Load, Pending
from baton.actors.expert_policies import ExpertKey, ExpertPolicy
from baton.actors.expert_store import ExpertStore
from baton.errors import EngineError

log = logging.getLogger(__name__)

SLOT_WAIT_S = 60.0  # a slot frees within one layer's compute; far longer means a bug


class ExpertCache:
    """`capacity` expert slots on `device`, filled from `store`, evicted by `policy`.

    Called by one forward thread (`acquire`, `release`, `prefetch`) plus the cache's own loader
    thread; every table is guarded by one condition variable.
    """

    def __init__(self, store: ExpertStore, capacity: int, device: torch.device,
                 policy: ExpertPolicy):
        shape = store.shape
        self.store = store
        self.capacity = capacity
        self.policy = policy
        self.device = device
        self.expert_bytes = shape.nbytes
        self.gate_up, self.down = self._slot_pool()
        self._stats = ExpertCacheStats()
        self._uses: Counter[ExpertKey] = Counter()  # forwards that used each expert, so far
        self._hit_log: list[list[ExpertKey]] = []  # hits not yet counted (`_count_hits`)
        self._slot_of: dict[ExpertKey, int] = {}
        self._key_of: list[ExpertKey | None] = [None] * capacity
        self._load: list[Load | None] = [None] * capacity
        self._pins = [0] * capacity
        self._free = list(range(capacity - 1, -1, -1))  # empty slots, the lowest on top
        self._idle: dict[ExpertKey, None] = {}  # resident, ready and unpinned: evictable
        self._prefetched: set[ExpertKey] = set()  # loaded ahead, not used yet
        self._queue: deque[ExpertKey] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._loader: threading.Thread | None = None
        cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if cuda else None
        self._freed: list[torch.cuda.Event | None] = [None] * capacity  # compute done with slot
        self._written: list[torch.cuda.Event | None] = [None] * capacity  # last copy into slot

    def _slot_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots' memory: `gate_up [capacity, 2I, H]`, `down [capacity, H, I]`."""
        shape = self.store.shape
        return (torch.empty((self.capacity, *shape.gate_up), dtype=shape.dtype,
                            device=self.device),
                torch.empty((self.capacity, *shape.down), dtype=shape.dtype, device=self.device))

    @property
    def budget_bytes(self) -> int:
        """Bytes the slot pool holds on the device (capacity x one expert)."""
        return self.capacity * self.expert_bytes

    @property
    def stats(self) -> ExpertCacheStats:
        """The counters so far (the cache's own record: `snapshot` for a consistent copy)."""
        with self._cond:
            self._count_hits()
            return self._stats

    def snapshot(self) -> dict[str, float]:
        """The counters (see `ExpertCacheStats.as_dict`), read consistently."""
        with self._cond:
            self._count_hits()
            return self._stats.as_dict()

    @property
    def uses(self) -> Counter[ExpertKey]:
        """How many forwards used each expert, so far (the cache's own counter: copy it to
        keep it)."""
        with self._cond:
            self._count_hits()
            return self._uses

    def resident(self) -> list[ExpertKey]:
        """Experts resident or loading now."""
        with self._cond:
            return [k for k in self._key_of if k is not None]

    # -- forward side -----------------------------------------------------------------------------

    def acquire(self, layer: int, experts: list[int]) -> list[int]:
        """Slots holding `experts` of `layer`, ready to read, pinned until `release`.

        At most `capacity` experts at once. Misses load synchronously; the time spent loading
        or waiting for an in-flight prefetch counts as stall.
        """
        if len(experts) > self.capacity:
            raise EngineError(f"{len(experts)} experts asked for at once; the cache holds "
                              f"{self.capacity}")
        t0 = time.perf_counter()
        slot_of: dict[int, int] = {}
        misses: list[Pending] = []
        waits: list[Pending] = []
        with self._cond:
            self._count_hits()
            resident = self._slot_of
            # Resident ones first: pinned, they cannot become the victim of this call's misses.
            order = experts if all((layer, e) in resident for e in experts) else \
                sorted(experts, key=lambda e: (layer, e) not in resident)
            for e in order:
                key = (layer, e)
                slot = resident.get(key)
                # Reserving may wait for a slot, and the loader may bring `key` in meanwhile.
                reserved = self._reserve(key) if slot is None else None
                if reserved is not None:
                    self._stats.misses += 1
                    slot, load = reserved
                    misses.append((slot, key, load))
                else:
                    slot = self._slot_of[key]
                    self._stats.hits += 1
                    if key in self._prefetched:
                        self._prefetched.discard(key)
                        self._stats.prefetches_used += 1
                    load = self._load[slot]
                    if load is not None:
                        waits.append((slot, key, load))
                self._pins[slot] += 1
                self._settle(slot)
                self.policy.touch(key)
                self._uses[key] += 1
                slot_of[e] = slot
        if misses or waits:
            self._fill(misses, waits)
            with self._cond:
                self._stats.stall_seconds += time.perf_counter() - t0
        return [slot_of[e] for e in experts]

    def settled(self, layer: int, experts: list[int], coming: list[ExpertKey]
                ) -> list[int] | None:
        """The slots of `experts` of `layer` when nothing can evict or load any of them until the
        forward is done with the layer: all resident and read, `coming` (the next prefetch) all
        resident, no read in flight. The hits are counted; the slots need no `release`. None
        otherwise: `acquire` them. Only a cache whose forward thread alone evicts can say so."""
        return None

    def _fill(self, misses: list[Pending], waits: list[Pending]) -> None:
        """Load `misses` into their slots and wait for `waits` (loads in flight); a load that
        failed is read again here."""
        for slot, key, load in misses:
            self._copy(slot, key, load, side=False)
        for slot, key, load in waits:
            load.wait()
            if load.failed:
                self._reload(slot, key)

    def _reload(self, slot: int, key: ExpertKey) -> None:
        with self._cond:
            retry = self._load[slot] = self._new_load()
        self._copy(slot, key, retry, side=False)

    def loading(self, slot: int) -> bool:
        """Whether `slot`, acquired, may still be loading (then `ready` waits for it)."""
        return False

    def loading_among(self, slots: list[int]) -> set[int]:
        """Those of acquired `slots` that may still be loading."""
        return {slot for slot in slots if self.loading(slot)}

    def ready(self, slot: int) -> None:
        """Return once acquired `slot` can be read (`acquire` here waits for every slot)."""

    def release(self, slots: list[int]) -> None:
        """The forward is done reading `slots` (on CUDA: once the kernels queued so far ran)."""
        with self._cond:
            self._unpin(slots)
            if self._side is not None:
                for slot in slots:
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(self.device))
                    self._freed[slot] = event
            self._cond.notify_all()

    def prefetch(self, keys: list[ExpertKey]) -> None:
        """Queue `keys` for the loader thread in place of older predictions still queued (those
        resident already are skipped)."""
        with self._cond:
            if self._closed:
                return
            self._queue.clear()
            self._queue.extend(k for k in keys if k not in self._slot_of)
            if not self._queue:
                return
            if self._loader is None:
                self._loader = threading.Thread(target=self._run_loader, name="expert-prefetch",
                                                daemon=True)
                self._loader.start()
            self._cond.notify_all()

    def idle(self) -> bool:
        """No prefetch is queued or copying: the store is not being read."""
        with self._cond:
            return not self._queue and all(self._ready(s) for s in range(self.capacity))

    def close(self) -> None:
        """Stop the loader thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        if self._loader is not None:
            self._loader.join(timeout=SLOT_WAIT_S)

    # -- inside -----------------------------------------------------------------------------------

    def _reserve(self, key: ExpertKey, wait: bool = True) -> tuple[int, Load] | None:
        """A slot for `key` (free, or its policy's victim), marked loading; None when `key`
        became resident while this waited for a slot (the other thread loads it), or when no
        slot is free and not `wait`. Holds `_cond`."""
        self._count_hits()  # the policy sees every use before it picks a victim
        deadline = time.monotonic() + SLOT_WAIT_S
        while True:
            if key in self._slot_of:
                return None
            slot = self._free.pop() if self._free else None
            if slot is None and self._idle:
                victim = self.policy.victim(self._idle, key)
                slot = self._slot_of.pop(victim)
                del self._idle[victim]
                self.policy.forget(victim)
                self._prefetched.discard(victim)
            if slot is not None:
                break
            if not wait:
                return None
            if self._closed or not self._wait_for_slot(deadline - time.monotonic()):
                raise EngineError(f"no expert slot freed within {SLOT_WAIT_S:.0f}s "
                                  f"({self.capacity} slots, all in use)")
        self._slot_of[key] = slot
        self._key_of[slot] = key
        load = self._load[slot] = self._new_load()
        self.policy.insert(key)
        return slot, load

    def _unpin(self, slots: list[int]) -> None:
        """Drop one pin of each of `slots`; those left unpinned become evictable once read.
        Holds `_cond`."""
        pins = self._pins
        for slot in slots:
            pins[slot] -= 1
            if not pins[slot]:  # still pinned: not evictable, as it was
                self._settle(slot)

    def _count_hits(self) -> None:
        """Count the hits a subclass's fast path logged (`_hit_log`), in order: the stats, the
        prefetches they used, the policy's `touch` and `uses`. Holds `_cond`."""
        if not self._hit_log:
            return
        log, self._hit_log = self._hit_log, []
        stats, prefetched, policy = self._stats, self._prefetched, self.policy
        for keys in log:
            stats.hits += len(keys)
            for key in keys:
                if key in prefetched:
                    prefetched.discard(key)
                    stats.prefetches_used += 1
                policy.touch(key)
            self._uses.update(keys)

    def _new_load(self) -> Load:
        """A load's record; its issued flag is an event the loader thread sets."""
        return Load()

    def _wait_for_slot(self, timeout: float) -> bool:
        """Wait until a pin or a load may have freed a slot; False on timeout. Holds `_cond`."""
        return self._cond.wait(timeout)

    def _ready(self, slot: int) -> bool:
        load = self._load[slot]
        return load is None or load.issued.is_set()

    def _settle(self, slot: int) -> None:
        """Keep `_idle` true to `slot` after its pins or load changed. Holds `_cond`."""
        key = self._key_of[slot]
        if key is None:
            return
        if self._pins[slot] == 0 and self._ready(slot):
            self._idle[key] = None
        else:
            self._idle.pop(key, None)

    def _copy(self, slot: int, key: ExpertKey, load: Load, side: bool) -> None:
        """Copy `key` from the store into `slot`, then mark it ready. On CUDA the copy runs on
        the side stream (`side`: a prefetch) or the compute stream (a miss), after the compute
        that last read the slot and the copy that last wrote it."""
        if self._side is None:
            self.store.read_into(*key, self.gate_up[slot], self.down[slot])
        else:
            gate_up, down = self.store.read(*key)
            stream = self._side if side else torch.cuda.current_stream(self.device)
            with torch.cuda.stream(stream):
                for event in (self._freed[slot], self._written[slot]):
                    if event is not None:
                        stream.wait_event(event)
                self.gate_up[slot].copy_(gate_up, non_blocking=True)
                self.down[slot].copy_(down, non_blocking=True)
                load.cuda_event = self._written[slot] = torch.cuda.Event()
                load.cuda_event.record(stream)
        with self._cond:
            self._loaded(slot, key, load)
            self._cond.notify_all()

    def _loaded(self, slot: int, key: ExpertKey, load: Load) -> None:
        """`load` of `key` into `slot` is issued: count it and let the slot be read (and, once
        unpinned, evicted). Holds `_cond`."""
        self._stats.bytes_loaded += self.expert_bytes
        if load.cuda_event is None and self._load[slot] is load:
            self._load[slot] = None
        load.issued.set()
        if self._key_of[slot] == key:
            self._settle(slot)

    def _run_loader(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                key = self._queue.popleft()
                if key in self._slot_of:
                    continue
                try:
                    reserved = self._reserve(key)
                except EngineError:
                    log.warning("prefetch of expert %s dropped: no slot freed", key)
                    continue
                if reserved is None:
                    continue  # the forward loaded it meanwhile
                slot, load = reserved
                self._prefetched.add(key)
                self._stats.prefetches_issued += 1
            try:
                self._copy(slot, key, load, side=True)
            except Exception:  # a failed prefetch must not kill the loader; the forward reloads
                log.exception("prefetch of expert %s failed", key)
                with self._cond:
                    self._evict_failed(slot, key, load)

    def _evict_failed(self, slot: int, key: ExpertKey, load: Load) -> None:
        load.failed = True
        if self._slot_of.get(key) == slot and self._pins[slot] == 0:
            del self._slot_of[key]
            self._key_of[slot] = None
            self._load[slot] = None
            self._idle.pop(key, None)
            self._free.append(slot)
            self._prefetched.discard(key)
            self.policy.forget(key)
        load.issued.set()
        self._cond.notify_all()
