"""`/metrics` shows the expert caches of workers serving an offloaded MoE model: hit rate as a
gauge, bytes loaded and stall seconds as counters read from the workers, labelled like the KV
usage gauge; dense workers add nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from baton.router.metrics import RouterMetrics

EXPERT_METRICS = ("baton:expert_cache_hit_rate", "baton:expert_bytes_loaded",
                  "baton:expert_stall_seconds")


class FakeWorker:
    """Answers `info.remote()` like a worker actor, with a fixed info."""

    def __init__(self, info: dict[str, Any]):
        self.info = self
        self._info = info

    async def remote(self) -> dict[str, Any]:
        return self._info


def info(pid: int, role: str, expert_cache: dict[str, Any] | None) -> dict[str, Any]:
    return {"node_id": "abcdef0123456789", "pid": pid, "role": role, "kv_usage": 0.5,
            "num_waiting": 0, "expert_cache": expert_cache}


def moe_cache(hits: int, misses: int, bytes_loaded: int, stall: float) -> dict[str, Any]:
    return {"tier": "disk", "policy": "LookaheadPolicy", "hits": hits, "misses": misses,
            "hit_rate": hits / (hits + misses), "bytes_loaded": bytes_loaded,
            "stall_seconds": stall, "prefetches_issued": 0, "prefetches_used": 0}


def scrape(metrics: RouterMetrics, infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Poll fake workers with `infos`, render, and parse: family name -> family."""
    asyncio.run(metrics.poll_workers([FakeWorker(i) for i in infos]))
    text = metrics.render().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family) -> dict[tuple[str, str], tuple[str, float]]:
    """(worker, role) -> (sample name, value)."""
    return {(s.labels["worker"], s.labels["role"]): (s.name, s.value) for s in family.samples}


def test_moe_workers_expose_their_expert_cache_and_dense_workers_add_nothing():
    metrics = RouterMetrics("smollm2-moe")
    got = scrape(metrics, [info(11, "decode", moe_cache(75, 25, 4096, 0.5)),
                           info(12, "prefill", None)])
    assert (got["baton:expert_cache_hit_rate"].type, got["baton:expert_bytes_loaded"].type,
            got["baton:expert_stall_seconds"].type) == ("gauge", "counter", "counter")
    moe = ("abcdef01:11", "decode")
    assert samples(got["baton:expert_cache_hit_rate"]) == {
        moe: ("baton:expert_cache_hit_rate", 0.75)}
    assert samples(got["baton:expert_bytes_loaded"]) == {
        moe: ("baton:expert_bytes_loaded_total", 4096.0)}
    assert samples(got["baton:expert_stall_seconds"]) == {
        moe: ("baton:expert_stall_seconds_total", 0.5)}
    assert {s.labels["model_name"] for f in EXPERT_METRICS for s in got[f].samples} == {
        "smollm2-moe"}
    text = metrics.render().decode()
    for name in ("baton:expert_bytes_loaded_total", "baton:expert_stall_seconds_total"):
        assert f"# TYPE {name} counter" in text.splitlines()
    # The KV usage gauge carries the same labels for the same worker.
    assert moe in samples(got["baton:kv_cache_usage_perc"])

    # The counters are the worker's own: the next scrape shows what the worker says now.
    got = scrape(metrics, [info(11, "decode", moe_cache(150, 30, 6144, 0.75))])
    assert samples(got["baton:expert_bytes_loaded"]) == {
        moe: ("baton:expert_bytes_loaded_total", 6144.0)}
    assert samples(got["baton:expert_stall_seconds"])[moe][1] == 0.75


def test_a_dense_cluster_exposes_no_expert_samples():
    got = scrape(RouterMetrics("smollm2"), [info(11, "decode", None), info(12, "prefill", None)])
    assert all(not got[f].samples for f in EXPERT_METRICS if f in got)
    assert len(got["baton:kv_cache_usage_perc"].samples) == 2
