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
from dataclasses import asdict, dataclass

import torch

from baton.actors.expert_policies import ExpertKey, ExpertPolicy
from baton.actors.expert_store import ExpertStore
from baton.errors import EngineError

log = logging.getLogger(__name__)

SLOT_WAIT_S = 60.0  # a slot frees within one layer's compute; far longer means a bug


@dataclass(slots=True)
class ExpertCacheStats:
    """Counters since the cache was built. Every expert a layer uses is one hit or one miss."""

    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    stall_seconds: float = 0.0
    prefetches_issued: int = 0
    prefetches_used: int = 0

    def as_dict(self) -> dict[str, float]:
        """The counters plus hit rate, prefetch precision (used / issued) and recall (uses that a
        prefetch served / all uses)."""
        uses = self.hits + self.misses
        return {
            **asdict(self),
            "hit_rate": self.hits / uses if uses else 0.0,
            "prefetch_precision": (self.prefetches_used / self.prefetches_issued
                                   if self.prefetches_issued else 0.0),
            "prefetch_recall": self.prefetches_used / uses if uses else 0.0,
        }


class _Load:
    """One expert's copy into a slot: `wait()` returns once the forward may read the slot."""

    def __init__(self) -> None:
        self.issued = threading.Event()
        self.failed = False  # the copy raised: whoever waits loads the expert itself
        self.cuda_event: torch.cuda.Event | None = None
        self.ticket: int | None = None  # the store's read in flight (`store.begin_reads`)

    def wait(self) -> None:
        self.issued.wait()
        if self.cuda_event is not None:  # ordered on the GPU, no host stall
            torch.cuda.current_stream().wait_event(self.cuda_event)


_Pending = tuple[int, ExpertKey, _Load]  # slot, expert, its load


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
        self.stats = ExpertCacheStats()
        self.uses: Counter[ExpertKey] = Counter()  # forwards that used each expert, so far
        self._slot_of: dict[ExpertKey, int] = {}
        self._key_of: list[ExpertKey | None] = [None] * capacity
        self._load: list[_Load | None] = [None] * capacity
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

    def snapshot(self) -> dict[str, float]:
        """The counters (see `ExpertCacheStats.as_dict`), read consistently."""
        with self._cond:
            return self.stats.as_dict()

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
        misses: list[_Pending] = []
        waits: list[_Pending] = []
        with self._cond:
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
                    self.stats.misses += 1
                    slot, load = reserved
                    misses.append((slot, key, load))
                else:
                    slot = self._slot_of[key]
                    self.stats.hits += 1
                    if key in self._prefetched:
                        self._prefetched.discard(key)
                        self.stats.prefetches_used += 1
                    load = self._load[slot]
                    if load is not None:
                        waits.append((slot, key, load))
                self._pins[slot] += 1
                self._settle(slot)
                self.policy.touch(key)
                self.uses[key] += 1
                slot_of[e] = slot
        if misses or waits:
            self._fill(misses, waits)
            with self._cond:
                self.stats.stall_seconds += time.perf_counter() - t0
        return [slot_of[e] for e in experts]

    def _fill(self, misses: list[_Pending], waits: list[_Pending]) -> None:
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
            retry = self._load[slot] = _Load()
        self._copy(slot, key, retry, side=False)

    def loading(self, slot: int) -> bool:
        """Whether `slot`, acquired, may still be loading (then `ready` waits for it)."""
        return False

    def ready(self, slot: int) -> None:
        """Return once acquired `slot` can be read (`acquire` here waits for every slot)."""

    def release(self, slots: list[int]) -> None:
        """The forward is done reading `slots` (on CUDA: once the kernels queued so far ran)."""
        with self._cond:
            for slot in slots:
                self._pins[slot] -= 1
                self._settle(slot)
                if self._side is not None:
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

    def _reserve(self, key: ExpertKey, wait: bool = True) -> tuple[int, _Load] | None:
        """A slot for `key` (free, or its policy's victim), marked loading; None when `key`
        became resident while this waited for a slot (the other thread loads it), or when no
        slot is free and not `wait`. Holds `_cond`."""
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
        load = self._load[slot] = _Load()
        self.policy.insert(key)
        return slot, load

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

    def _copy(self, slot: int, key: ExpertKey, load: _Load, side: bool) -> None:
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

    def _loaded(self, slot: int, key: ExpertKey, load: _Load) -> None:
        """`load` of `key` into `slot` is issued: count it and let the slot be read (and, once
        unpinned, evicted). Holds `_cond`."""
        self.stats.bytes_loaded += self.expert_bytes
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
                self.stats.prefetches_issued += 1
            try:
                self._copy(slot, key, load, side=True)
            except Exception:  # a failed prefetch must not kill the loader; the forward reloads
                log.exception("prefetch of expert %s failed", key)
                with self._cond:
                    self._evict_failed(slot, key, load)

    def _evict_failed(self, slot: int, key: ExpertKey, load: _Load) -> None:
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
