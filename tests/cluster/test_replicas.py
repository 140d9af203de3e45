"""The controller's pool bookkeeping (no Ray): slots for pinned cores, what to start, what to
drain on scale-down; and its registry writes (they never wait for Redis, nor raise without it)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from baton.actors.worker import WorkerSpec
from baton.cluster.adoption import LiveWorker, adopt_workers
from baton.cluster.config import ClusterConfig, PoolConfig
from baton.cluster.registry import RegistryWriter
from baton.cluster.replicas import PoolReplicas
from baton.cluster.state import WorkerInfo, WorkerLoad
from baton.errors import ConfigError


def pinned(replicas: int = 2) -> PoolReplicas:
    return PoolReplicas(PoolConfig(name="d", role="decode", replicas=replicas, num_cpus=2,
                                   cpu_cores=list(range(2 * replicas))))


def test_a_replacement_takes_the_dead_replicas_slot_and_a_new_id() -> None:
    p = pinned()
    a, b = (p.new_replica(object(), p.free_slot()) for _ in range(2))
    assert (a.worker_id, a.slot, b.worker_id, b.slot) == ("d-0", 0, "d-1", 1)
    assert p.free_slot() is None and p.missing() == 0
    a.enter("dead")
    assert p.missing() == 1 and p.free_slot() == 0
    c = p.new_replica(object(), 0)
    assert c.worker_id == "d-2"


def test_an_adopted_worker_keeps_its_id_and_cores_and_later_ids_follow_it() -> None:
    p = pinned(3)  # slots of 2 cores: [0, 1], [2, 3], [4, 5]
    r = p.adopt("d-4", object(), [4, 5], {"num_running": 2})
    assert (r.worker_id, r.slot, r.state, r.in_flight) == ("d-4", 2, "ready", 2)
    assert p.free_slot() == 0 and p.new_replica(object(), 0).worker_id == "d-5"
    loose = PoolReplicas(PoolConfig(name="u", role="decode"))
    assert loose.adopt("u-1", object(), None, {}).slot == 0  # unpinned: any free slot


def test_a_restarted_controller_adopts_by_pool_with_recorded_targets_and_fresh_ids() -> None:
    def live(worker_id: str, role: str, cores: list[int] | None = None) -> LiveWorker:
        spec = WorkerSpec(role=role, model="tiny:llama", kv_token="t", cpu_affinity=cores)
        return LiveWorker(worker_id, object(), spec, {})

    pools = {"d": pinned(3), "p": PoolReplicas(PoolConfig(name="p", role="prefill"))}
    adopted, strays = adopt_workers(
        pools, [live("d-1", "decode", [2, 3]), live("x-0", "decode"), live("p-0", "decode")],
        {"d": 2}, registered={"d-1", "d-7", "p-3"})
    assert [(r.worker_id, r.slot) for r in adopted] == [("d-1", 1)]
    assert [w.worker_id for w in strays] == ["x-0", "p-0"]  # no such pool; wrong role
    assert (pools["d"].target, pools["p"].target) == (2, 1)  # recorded; else the config's
    assert (pools["d"].next_id(), pools["p"].next_id()) == ("d-8", "p-4")  # never reused


def test_pinned_pool_cannot_outgrow_its_cores() -> None:
    p = pinned()
    p.check_target(1)
    with pytest.raises(ConfigError, match="room for 2 replicas"):
        p.check_target(3)
    PoolReplicas(PoolConfig(name="u", role="decode")).check_target(8)  # unpinned: any count


def test_drained_replica_holds_its_cores_until_gone() -> None:
    p = pinned(1)
    r = p.new_replica(object(), 0)
    r.enter("draining")
    r.replace = True  # drain: replaced once gone, not before
    assert p.missing() == 0 and p.free_slot() is None
    p.forget(r)
    assert p.missing() == 1 and p.free_slot() == 0


def test_scale_down_stops_starting_first_then_drains_least_loaded() -> None:
    p = PoolReplicas(PoolConfig(name="u", role="decode", replicas=4))
    busy, idle, starting = (p.new_replica(object(), i) for i in range(3))
    for r, n in ((busy, 3), (idle, 0)):
        r.enter("ready")
        r.info = {"num_running": n, "num_waiting": 0}
    p.target = 3
    assert p.surplus() == ([], [])
    p.target = 1
    assert p.surplus() == ([starting], [idle])
    p.target = 0
    assert p.surplus() == ([starting], [idle, busy])


class HungState:
    """Stands in for the Redis state of a registry writer: every call blocks until released."""

    def __init__(self) -> None:
        self.called = threading.Event()
        self.release = threading.Event()
        self.done: list[tuple[str, str]] = []

    def register(self, info: WorkerInfo) -> None:
        self._call("register", info.worker_id)

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> None:
        self._call("heartbeat", worker_id)

    def deregister(self, worker_id: str) -> None:
        self._call("deregister", worker_id)

    def close(self) -> None:
        self.done.append(("close", ""))

    def _call(self, name: str, worker_id: str) -> None:
        self.called.set()
        if self.release.wait(30):
            self.done.append((name, worker_id))


def test_registry_writes_never_hold_up_the_controller() -> None:
    config = ClusterConfig(name="hung")
    r = PoolReplicas(config.pools[1]).new_replica(object(), 0)
    r.info = {"num_running": 1, "kv_address": "127.0.0.1:1"}
    hung = HungState()

    async def main() -> None:
        writer = RegistryWriter(config, None)
        writer.state = hung  # type: ignore[assignment]
        writer.register(r)
        writer.heartbeat([r])
        writer.deregister(r.worker_id)
        # All three returned while the first is still stuck in Redis.
        assert await asyncio.to_thread(hung.called.wait, 30)
        assert hung.done == []
        hung.release.set()
        await writer.close()  # lets the queued writes through, in order

    asyncio.run(main())
    assert hung.done == [("register", "decode-0"), ("heartbeat", "decode-0"),
                         ("deregister", "decode-0"), ("close", "")]


def test_registry_writes_with_redis_away_do_not_raise() -> None:
    config = ClusterConfig(name="away")
    r = PoolReplicas(config.pools[1]).new_replica(object(), 0)
    r.info = {"num_running": 1, "kv_address": "127.0.0.1:1"}

    async def main() -> None:
        writer = RegistryWriter(config, "redis://127.0.0.1:1/0")  # nothing listens there
        for _ in range(20):
            writer.register(r)
            writer.heartbeat([r])
            writer.deregister(r.worker_id)
        await writer.close()

    asyncio.run(main())
