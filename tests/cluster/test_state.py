"""Cluster state on a real redis-server: registry with expiry, journal, history, router stats,
persistence across a restart, and degradation (no raise, cached registry) while Redis is away."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from baton.cluster.config import load_config
from baton.cluster.redis_server import RedisServer
from baton.cluster.state import ClusterState, PerfRecord, WorkerInfo, WorkerLoad
from baton.errors import ConfigError
from baton.outputs import ExpertCacheUse
from baton.records import ExpertCacheStatus
from tests.conftest import wait_until

TTL = 1.0  # heartbeat TTL here: outlasts a busy machine's pauses, short enough to wait out


def worker(worker_id: str, role: str = "decode", pool: str = "decode") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, pool=pool, node="n1",  # type: ignore[arg-type]
                      address=f"127.0.0.1:{5000 + len(worker_id)}", model="tiny")


def perf(i: int, method: str = "ngram") -> PerfRecord:
    """Record `i`; odd ones come from an offloaded MoE model and carry expert-cache figures."""
    experts = ExpertCacheUse(hits=i, misses=2, bytes_loaded=4096 * i, stall_seconds=0.001 * i)
    return PerfRecord(request_id=f"r{i}", method=method, prefill_path="local",
                      features={"prompt_tokens": float(i)}, ttft_s=0.01 * i, tpot_s=0.02,
                      tokens_per_s=50.0, prompt_tokens=i, output_tokens=8,
                      expert_cache=experts if i % 2 else None)


@pytest.fixture
def state(redis_url: str) -> Iterator[ClusterState]:
    """State on the shared server under a cluster name of this test's own."""
    s = ClusterState(redis_url, cluster=f"t{uuid.uuid4().hex[:10]}", heartbeat_ttl_s=TTL)
    yield s
    s.close()


def test_registry_heartbeats_and_expiry(state: ClusterState, redis_url: str) -> None:
    assert state.register(worker("w1"))
    assert state.register(worker("w2", role="prefill", pool="prefill"))
    moe = ExpertCacheStatus(hits=3, misses=1, hit_rate=0.75, bytes_loaded=4096, stall_seconds=0.5)
    assert state.heartbeat("w1", WorkerLoad(running=3, waiting=1, kv_usage=0.25,
                                            expert_cache=moe))
    live = {w.info.worker_id: w for w in state.workers()}
    assert set(live) == {"w1", "w2"}
    assert live["w1"].load == WorkerLoad(running=3, waiting=1, kv_usage=0.25, expert_cache=moe)
    assert live["w2"].load is None and live["w2"].info.address.startswith("127.0.0.1:")
    assert [w.info.worker_id for w in state.workers(pool="prefill")] == ["w2"]

    # Only w1 keeps beating: w2 drops out once its TTL passes.
    def only_w1() -> bool:
        state.heartbeat("w1", WorkerLoad(running=1))
        return [w.info.worker_id for w in state.workers()] == ["w1"]
    wait_until(only_w1, 10 * TTL, "w2's registration to expire")

    # Another instance (the router) sees the same registry; a heartbeat for a worker it never
    # registered does not make one up.
    other = ClusterState(redis_url, cluster=state.cluster)
    assert [w.info.worker_id for w in other.workers()] == ["w1"]
    assert not other.heartbeat("ghost", WorkerLoad())
    assert "ghost" not in {w.info.worker_id for w in other.workers()}

    state.deregister("w1")
    assert other.workers() == []
    other.close()


def test_registered_worker_comes_back_by_heartbeat_alone(state: ClusterState) -> None:
    state.register(worker("w1"))
    wait_until(lambda: state.workers() == [], 10 * TTL, "w1's registration to expire")
    assert state.heartbeat("w1", WorkerLoad(waiting=2))  # info written back with the beat
    [w] = state.workers()
    assert w.info == worker("w1") and w.load == WorkerLoad(waiting=2)


def test_journal_round_trip(state: ClusterState) -> None:
    state.accepted("a", pool="decode", method="none")
    state.accepted("b")
    state.finished("a", finish_reason="length", output_tokens=8)
    state.failed("b", "UNAVAILABLE: decode worker died")
    events = state.events()
    assert [(e.request_id, e.event) for e in events] == [
        ("a", "accepted"), ("b", "accepted"), ("a", "finished"), ("b", "failed")]
    assert events[0].detail == {"pool": "decode", "method": "none"}
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    [acc, fail] = state.request_events("b")
    assert fail.event == "failed" and fail.reason == "UNAVAILABLE: decode worker died"
    assert acc.reason == ""
    assert [e.event for e in state.events(limit=2)] == ["finished", "failed"]


def test_streams_stay_bounded(redis_url: str) -> None:
    s = ClusterState(redis_url, cluster=f"t{uuid.uuid4().hex[:10]}", journal_maxlen=10,
                     history_maxlen=10, background_writes=True)
    for i in range(1000):
        s.accepted(f"r{i}")
        s.record(perf(i))
    assert s.flush()
    raw = redis.Redis.from_url(redis_url)
    # Trimming is approximate (whole stream nodes of 100 entries), never unbounded.
    assert raw.xlen(f"baton:{s.cluster}:journal") <= 200
    assert raw.xlen(f"baton:{s.cluster}:history") <= 200
    assert s.history(limit=1)[0].request_id == "r999"
    s.close()


def redis_now_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return seconds * 1000 + micros // 1000


def test_history_round_trip_and_since(state: ClusterState, redis_url: str) -> None:
    for i in range(5):
        state.record(perf(i))
    # `since` goes by Redis's clock, in the milliseconds of stream ids: cut between the last
    # record's millisecond and the next one, and write the rest once Redis's clock is past it.
    raw = redis.Redis.from_url(redis_url)
    last_id = raw.xinfo_stream(f"baton:{state.cluster}:history")["last-generated-id"]
    cut_ms = int(last_id.split(b"-")[0]) + 1
    wait_until(lambda: redis_now_ms(raw) > cut_ms, 5, "Redis's clock to pass the cut")
    cut = (cut_ms + 0.5) / 1000
    for i in range(5, 8):
        state.record(perf(i, method="draft"))
    assert [r.request_id for r in state.history()] == [f"r{i}" for i in range(8)]
    assert state.history()[3] == perf(3).model_copy(update={"ts": state.history()[3].ts})
    assert state.history()[3].expert_cache == ExpertCacheUse(3, 2, 4096 * 3, 0.003)
    assert state.history()[2].expert_cache is None
    assert [r.request_id for r in state.history(limit=2)] == ["r6", "r7"]
    assert [r.method for r in state.history(since=cut)] == ["draft"] * 3
    assert [r.request_id for r in state.history(since=cut, limit=1)] == ["r5"]


def test_unreadable_entries_are_skipped(state: ClusterState, redis_url: str) -> None:
    state.record(perf(1))
    redis.Redis.from_url(redis_url).xadd(f"baton:{state.cluster}:history", {"r": "not json"})
    state.record(perf(2))
    assert [r.request_id for r in state.history()] == ["r1", "r2"]


def test_background_writes_land_in_order(redis_url: str) -> None:
    s = ClusterState(redis_url, cluster=f"t{uuid.uuid4().hex[:10]}", background_writes=True)
    for i in range(50):
        s.record(perf(i))
    s.close()  # flushes
    fresh = ClusterState(redis_url, cluster=s.cluster)
    assert [r.request_id for r in fresh.history()] == [f"r{i}" for i in range(50)]
    fresh.close()


def test_router_stats(state: ClusterState) -> None:
    state.update_router_stats("router-a", counters={"requests": 2, "failed": 1},
                              gauges={"queue_depth": 4})
    before = time.time()
    state.update_router_stats("router-a", counters={"requests": 3}, gauges={"queue_depth": 1.5})
    after = time.time()
    state.update_router_stats("router-b", counters={"requests": 1})
    stats = state.router_stats()
    assert set(stats) == {"router-a", "router-b"}
    a = stats["router-a"]
    assert (a["requests"], a["failed"], a["queue_depth"]) == (5, 1, 1.5)
    assert before <= a["updated"] <= after  # the time of its last update


def test_refused_command_does_not_raise(state: ClusterState, redis_url: str) -> None:
    redis.Redis.from_url(redis_url).set(f"baton:{state.cluster}:history", "a string, not a stream")
    state.record(perf(1))
    assert state.history() == []
    assert state.dropped_writes == 1 and state.available  # Redis answered: no outage


def test_bad_cluster_name_and_url() -> None:
    with pytest.raises(ConfigError):
        ClusterState("redis://127.0.0.1:1/0", cluster="a:b")
    with pytest.raises(ConfigError, match="invalid Redis URL"):
        ClusterState("http://127.0.0.1:1/0")


def test_from_config(redis_url: str) -> None:
    config = load_config({"name": "cfg-test", "redis": {"heartbeat_ttl_s": 2.5}})
    s = ClusterState.from_config(config, redis_url)
    assert (s.cluster, s.heartbeat_ttl_s, s.history_maxlen) == ("cfg-test", 2.5, 100_000)
    assert config.redis.data_path(config.name).parts[-2:] == ("cfg-test", "redis")
    s.close()
    with pytest.raises(ConfigError, match="name"):
        load_config({"name": "a:b"})


def test_history_persists_across_a_server_restart(own_server: RedisServer) -> None:
    s = ClusterState(own_server.url, cluster="persist")
    for i in range(3):
        s.record(perf(i))
    s.close()
    own_server.stop()
    own_server.start()  # same data dir: the append-only file is replayed
    again = ClusterState(own_server.url, cluster="persist")
    assert [r.request_id for r in again.history()] == ["r0", "r1", "r2"]
    again.close()


def test_degrades_while_redis_is_away_and_reconnects(own_server: RedisServer, caplog) -> None:
    s = ClusterState(own_server.url, cluster="outage", heartbeat_ttl_s=60, timeout_s=0.2,
                     backoff_s=0.05, max_backoff_s=0.2)
    s.register(worker("w1"))
    s.heartbeat("w1", WorkerLoad(running=2))
    view = s.workers()
    assert len(view) == 1 and s.available

    own_server.stop()
    caplog.set_level(logging.INFO, logger="baton.cluster.state_link")
    for i in range(20):
        s.accepted(f"r{i}")
        s.record(perf(i))
        assert s.workers() == view  # the cached view, not an error
        assert s.history() == [] and s.events() == [] and s.router_stats() == {}
        s.update_router_stats("router-a", counters={"requests": 1})
    assert not s.available
    assert s.dropped_writes == 60
    assert not s.heartbeat("w1", WorkerLoad())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()

    own_server.start()  # same port and data dir
    wait_until(s.ping, 5, "the restarted server to answer")
    assert s.available
    assert any("back after" in r.getMessage() for r in caplog.records)
    s.record(perf(99))
    assert [r.request_id for r in s.history()] == ["r99"]  # writes resume (none were buffered)
    assert [w.info.worker_id for w in s.workers()] == ["w1"]  # kept by the append-only file
    s.close()


def new_connections(listener: socket.socket) -> int:
    """Connections made to `listener` since last asked (accepted and closed, never answered)."""
    listener.setblocking(False)
    n = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_a_silent_redis_is_not_waited_on_again_within_the_backoff() -> None:
    # A listener that never answers: the connection opens, every reply times out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        s = ClusterState(f"redis://:pw@127.0.0.1:{port}/0", cluster="silent", timeout_s=0.1,
                         backoff_s=600)
        assert not s.available  # its first ping timed out...
        assert new_connections(silent) >= 1  # ...on a connection it really opened
        s.record(perf(1))
        s.accepted("r1")
        assert s.workers() == [] and s.history() == [] and not s.ping()
        assert new_connections(silent) == 0  # within the backoff, no call waits on it again
        assert not s.available and s.dropped_writes == 2
        s.close()


def test_background_writes_never_wait_on_redis(caplog) -> None:
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused for now
        port = hung.getsockname()[1]
        # No backoff: the writer tries Redis on every batch.
        s = ClusterState(f"redis://:pw@127.0.0.1:{port}/0", cluster="silent", timeout_s=30,
                         backoff_s=0, max_backoff_s=0, background_writes=True, write_queue=5)
        hung.listen(16)  # now Redis hangs: it takes connections and never answers
        for i in range(100):
            s.record(perf(i))
        # Every call came back while the writer is still stuck on its first batch: what did
        # not fit the queue was dropped at once (and said so once), the rest still waits.
        assert 0 < s.dropped_writes < 100
        assert sum("queue full" in r.getMessage() for r in caplog.records) == 1
    # Redis gone for good (the listener closed): the writer gets its error and drops the rest.
    assert s.flush()
    assert s.dropped_writes == 100
    s.close()
