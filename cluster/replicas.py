"""The controller's bookkeeping for one pool: its target size, its replicas, ids and CPU slots.

No Ray and no Redis here: the controller (cluster/controller.py) does the calls and asks this
what to start, what to drain and what a dead replica leaves behind. A replica's slot is its
share of the pool's `cpu_cores` (slot i owns cores [i*n, (i+1)*n) for n = num_cpus), so a
replacement is pinned where the replica it replaces was.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from baton.cluster.config import PoolConfig
from baton.errors import ConfigError

ReplicaState = Literal["starting", "ready", "draining", "dead"]


@dataclass(slots=True)
class Replica:
    """One worker actor of a pool, from its start until it is stopped (or replaced, if dead)."""

    worker_id: str
    pool: str
    role: str
    slot: int
    handle: Any  # the worker's Ray actor handle
    state: ReplicaState = "starting"
    # While draining: start a replacement once it is gone (drain), or not (scale-down).
    replace: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # the worker's last `info()`
    misses: int = 0  # health pings in a row that timed out
    since: float = field(default_factory=time.monotonic)  # when it entered its state

    def enter(self, state: ReplicaState) -> None:
        self.state, self.since = state, time.monotonic()

    @property
    def in_flight(self) -> int:
        """Requests running or queued on it, as of its last `info()`."""
        return int(self.info.get("num_running", 0)) + int(self.info.get("num_waiting", 0))


class PoolReplicas:
    """One pool's replicas and target count; decides starts and scale-down drains."""

    def __init__(self, pool: PoolConfig):
        self.pool = pool
        self.target = pool.replicas
        self.replicas: list[Replica] = []
        self.restarts = 0  # replacements started for replicas that died
        self.start_failures = 0  # replicas that never became ready
        self.retry_at = 0.0  # monotonic time before which no replica is started (after a failure)
        self._next_id = 0

    @property
    def slots(self) -> int | None:
        """How many replicas the pool's pinned cores allow; None when it is not pinned."""
        if not self.pool.cpu_cores:
            return None
        return len(self.pool.cpu_cores) // int(self.pool.num_cpus)

    def check_target(self, replicas: int) -> None:
        """Raise ConfigError unless the pool can run `replicas` replicas."""
        if replicas < 0:
            raise ConfigError(f"pool {self.pool.name!r}: replicas must be >= 0, got {replicas}")
        if self.slots is not None and replicas > self.slots:
            raise ConfigError(
                f"pool {self.pool.name!r} is pinned to cores {self.pool.cpu_cores}, room for "
                f"{self.slots} replicas of {int(self.pool.num_cpus)} cores; to run {replicas}, "
                f"list more cpu_cores in the cluster config (or drop cpu_cores)")

    def in_state(self, *states: ReplicaState) -> list[Replica]:
        return [r for r in self.replicas if r.state in states]

    def find(self, worker_id: str) -> Replica | None:
        return next((r for r in self.replicas if r.worker_id == worker_id), None)

    def missing(self) -> int:
        """Replicas to start now to reach the target; draining ones due a replacement count as
        present, since the replacement starts only once they are gone (they hold their cores)."""
        present = len(self.in_state("starting", "ready"))
        present += sum(1 for r in self.in_state("draining") if r.replace)
        return self.target - present

    def free_slot(self) -> int | None:
        """The lowest slot no starting, ready or draining replica holds; None if all are held."""
        held = {r.slot for r in self.replicas if r.state != "dead"}
        limit = self.slots
        for slot in itertools.count():
            if limit is not None and slot >= limit:
                return None
            if slot not in held:
                return slot
        return None  # unreachable: count() is endless

    def next_id(self) -> str:
        """The id the next replica gets (`<pool>-<n>`, never one used before in this pool)."""
        worker_id = f"{self.pool.name}-{self._next_id}"
        self._next_id += 1
        return worker_id

    def new_replica(self, handle: Any, slot: int, worker_id: str | None = None) -> Replica:
        replica = Replica(worker_id or self.next_id(), self.pool.name, self.pool.role, slot,
                          handle)
        self.replicas.append(replica)
        return replica

    def adopt(self, worker_id: str, handle: Any, cores: list[int] | None,
              info: dict[str, Any]) -> Replica:
        """Take over a live worker a previous controller started: ready, in the slot its pinned
        cores say (any free one when the pool is not pinned); later ids follow its own."""
        slot = self.slot_of(cores)
        replica = self.new_replica(handle, slot if slot is not None else self._unheld_slot(),
                                   worker_id)
        replica.info = info
        replica.enter("ready")
        self.reserve_id(worker_id)
        return replica

    def reserve_id(self, worker_id: str) -> None:
        """Never give out `worker_id` (one a previous controller used), nor an id before it."""
        n = worker_id.rsplit("-", 1)[-1]
        if n.isdigit():
            self._next_id = max(self._next_id, int(n) + 1)

    def slot_of(self, cores: list[int] | None) -> int | None:
        """The slot a replica pinned to `cores` holds; None when the pool is not pinned (or the
        cores are not the pool's)."""
        if not self.pool.cpu_cores or not cores or cores[0] not in self.pool.cpu_cores:
            return None
        return self.pool.cpu_cores.index(cores[0]) // int(self.pool.num_cpus)

    def _unheld_slot(self) -> int:
        held = {r.slot for r in self.replicas if r.state != "dead"}
        return next(slot for slot in itertools.count() if slot not in held)

    def surplus(self) -> tuple[list[Replica], list[Replica]]:
        """Over target: (starting replicas to stop at once, ready ones to drain), least loaded
        first; draining replicas due a replacement lose it before anything else is stopped."""
        excess = -self.missing()
        for r in self.in_state("draining"):
            if excess <= 0:
                break
            if r.replace:
                r.replace, excess = False, excess - 1
        starting = self.in_state("starting")[::-1][:max(excess, 0)]
        excess -= len(starting)
        ready = sorted(self.in_state("ready"), key=lambda r: (r.in_flight, -r.since))
        return starting, ready[:max(excess, 0)]

    def forget(self, replica: Replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)

    def settled(self) -> bool:
        """At target with every replica ready: nothing starting, draining or dead."""
        return len(self.replicas) == self.target and all(r.state == "ready"
                                                         for r in self.replicas)

    def summary(self) -> dict[str, Any]:
        counts = {s: len(self.in_state(s)) for s in ("starting", "ready", "draining", "dead")}
        return {"pool": self.pool.name, "role": self.pool.role, "target": self.target, **counts,
                "restarts": self.restarts, "start_failures": self.start_failures}
