"""What the expert cache keeps per load and in total: the counters it reports, and the record of
one expert's copy into a slot (`Load`) that the forward waits on.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import torch

from baton.actors.expert_policies import ExpertKey
from baton.errors import EngineError


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


class Issued:
    """A load's issued flag where only the thread that sets it ever reads it (the AIO cache):
    `threading.Event`'s interface without its lock."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self) -> None:
        if not self._set:
            raise EngineError("waited on a load that no other thread can finish")


class Load:
    """One expert's copy into a slot: `wait()` returns once the forward may read the slot."""

    def __init__(self, threads: bool = True) -> None:
        self.issued: threading.Event | Issued = threading.Event() if threads else Issued()
        self.failed = False  # the copy raised: whoever waits loads the expert itself
        self.cuda_event: torch.cuda.Event | None = None
        self.ticket: int | None = None  # the store's read in flight (`store.begin_reads`)

    def wait(self) -> None:
        self.issued.wait()
        if self.cuda_event is not None:  # ordered on the GPU, no host stall
            torch.cuda.current_stream().wait_event(self.cuda_event)


Pending = tuple[int, ExpertKey, Load]  # slot, expert, its load
