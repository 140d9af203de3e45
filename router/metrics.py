"""Prometheus metrics of one router, named as users know them from vLLM but under `baton:`.

`RouterMetrics` is the router's request observer (`Router(observer=...)`): the router tells it
when a request is accepted, streams its first token, finishes or fails, so gRPC and HTTP requests
are counted alike. Each instance has its own `CollectorRegistry`, so two routers in one process
(tests, a colocated setup) never clash over a global one. Worker gauges (queue depth, KV usage)
and the expert caches of MoE-offload workers are read from the workers when `/metrics` is
scraped, not on every request.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from baton.outputs import RequestMetrics, RequestOutput
from baton.records import PerfRecord

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# vLLM's buckets, so dashboards built for it read Baton's histograms the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# The router's own time per request or chunk: fine around a millisecond, where it should sit.
ROUTER_BUCKETS = (0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.0006, 0.0008, 0.001, 0.00125,
                  0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0)
ERROR_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
PREFIX = "baton:"
WORKER_LABELS = ["model_name", "worker", "role"]


class ExpertCacheCollector:
    """The expert caches of the workers serving an offloaded MoE model, as the last scrape read
    them: hit rate (a gauge) and bytes loaded and stall seconds (counters). The workers own the
    counts, so they are reported as read, not incremented here; dense workers add no samples."""

    def __init__(self) -> None:
        self.caches: list[tuple[list[str], dict[str, Any]]] = []  # (labels, `expert_cache`)

    def describe(self) -> Iterator[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        return self._families(self.caches)

    def _families(self, caches: Sequence[tuple[list[str], dict[str, Any]]] = ()
                  ) -> Iterator[Metric]:
        hit_rate = GaugeMetricFamily(
            PREFIX + "expert_cache_hit_rate", "Share of a worker's expert uses served from its "
            "device expert cache (MoE offload), since the worker started.", labels=WORKER_LABELS)
        loaded = CounterMetricFamily(
            PREFIX + "expert_bytes_loaded_total", "Expert weight bytes a worker copied into its "
            "device expert cache (misses and prefetches).", labels=WORKER_LABELS)
        stall = CounterMetricFamily(
            PREFIX + "expert_stall_seconds_total", "Seconds a worker's forward passes waited "
            "for experts to load.", labels=WORKER_LABELS)
        for labels, cache in caches:
            hit_rate.add_metric(labels, float(cache.get("hit_rate", 0.0)))
            loaded.add_metric(labels, float(cache.get("bytes_loaded", 0)))
            stall.add_metric(labels, float(cache.get("stall_seconds", 0.0)))
        yield from (hit_rate, loaded, stall)


class RouterMetrics:
    """The router's Prometheus metrics; also its request observer (cheap calls, never raising).

    `in_flight` returns the router's requests streaming now (`baton:num_requests_running`).
    """

    def __init__(self, model_name: str, in_flight: Callable[[], int] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        reg, m = self.registry, ["model_name"]

        running = Gauge(PREFIX + "num_requests_running",
                        "Requests this router is streaming now.", m, registry=reg)
        if in_flight is not None:
            running.labels(model_name).set_function(in_flight)
        self.waiting = Gauge(PREFIX + "num_requests_waiting",
                             "Requests queued in the workers, waiting to be scheduled "
                             "(read from the workers at scrape time).", m, registry=reg)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_perc",
                              "Share of a worker's KV cache blocks in use (1 = full).",
                              WORKER_LABELS, registry=reg)
        self.expert_caches = ExpertCacheCollector()
        reg.register(self.expert_caches)
        self.success = Counter(PREFIX + "request_success", "Requests that finished, by reason.",
                               [*m, "finished_reason"], registry=reg)
        self.failures = Counter(PREFIX + "request_failures",
                                "Requests refused or failed, by reason (error type, deadline, "
                                "cancelled).", [*m, "reason"], registry=reg)
        self.by_path = Counter(PREFIX + "requests_by_path",
                               "Finished requests by how their prompt was prefilled (local on "
                               "the decode worker, or disaggregated).", [*m, "path"],
                               registry=reg)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of accepted "
                                     "requests.", m, registry=reg).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated by "
                                         "finished requests.", m, registry=reg).labels(model_name)
        self.kv_bytes = Counter(PREFIX + "kv_transfer_bytes", "KV cache bytes pushed from "
                                "prefill to decode workers.", m, registry=reg).labels(model_name)
        spec = [*m, "method"]
        self.by_method = Counter(PREFIX + "requests_by_method", "Finished requests by the "
                                 "acceleration method that served them.", spec, registry=reg)
        self.spec_drafts = Counter(PREFIX + "spec_decode_num_drafts", "Steps that verified a "
                                   "speculative draft.", spec, registry=reg)
        self.spec_draft_tokens = Counter(PREFIX + "spec_decode_num_draft_tokens",
                                         "Draft tokens proposed.", spec, registry=reg)
        self.spec_accepted = Counter(PREFIX + "spec_decode_num_accepted_tokens",
                                     "Draft tokens accepted.", spec, registry=reg)
        self.spec_accepted_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted, by position in the draft.",
                                             [*spec, "position"], registry=reg)
        self.method_selected = Counter(PREFIX + "method_selected", "Requests whose method the "
                                       "selector chose, by method (and whether it explored).",
                                       [*spec, "explored"], registry=reg)
        self.prediction_error = Histogram(
            PREFIX + "method_selector_prediction_error",
            "Per selected request, |log(predicted / achieved decode tokens/s)|.", m,
            buckets=ERROR_BUCKETS, registry=reg).labels(model_name)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Seconds from acceptance to the first token.", m,
                              buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean seconds per output token after the first, per request.", m,
                              buckets=TPOT_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Seconds from acceptance to the last token.", m,
                             buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        self.admission = Histogram(
            PREFIX + "router_admission_seconds", "Seconds from the router receiving a request "
            "to its call to the decode worker (validation, tokenization, method selection, "
            "worker choice).", m, buckets=ROUTER_BUCKETS, registry=reg).labels(model_name)
        self.relay = Histogram(
            PREFIX + "router_relay_seconds", "Seconds from a worker's chunk reaching the router "
            "to its write to the client, per chunk.", m, buckets=ROUTER_BUCKETS,
            registry=reg).labels(model_name)
        self.added_ttft = Histogram(
            PREFIX + "router_added_ttft_seconds", "The router's own share of a request's time "
            "to first token: its admission plus the relay of the first token's chunk.", m,
            buckets=ROUTER_BUCKETS, registry=reg).labels(model_name)

    @classmethod
    def attach(cls, router: Any) -> RouterMetrics:
        """The metrics a `Router` reports to, made its observer if it has none yet."""
        if isinstance(router.observer, cls):
            return router.observer
        metrics = cls(router.model.name, in_flight=lambda: router.in_flight)
        router.observer = metrics
        return metrics

    # -- the router's observer calls --------------------------------------------------------------

    def accepted(self, request_id: str, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, request_id: str, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def finished(self, request_id: str, last: RequestOutput | None, tpot_s: float | None,
                 e2e_s: float) -> None:
        reason = last.finish_reason if last is not None else None
        if last is None or reason == "error":
            self.failed(request_id, "worker_error")
            return
        self.success.labels(self.model_name, reason or "unknown").inc()
        self.by_path.labels(self.model_name, last.metrics.prefill_path).inc()
        self.generation_tokens.inc(len(last.token_ids))
        self.kv_bytes.inc(last.metrics.kv_bytes_received)
        self._spec(last.metrics)
        self.e2e.observe(e2e_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def relayed(self, request_id: str, relay_s: float) -> None:
        self.relay.observe(relay_s)

    def router_time(self, request_id: str, admission_s: float, first_relay_s: float) -> None:
        self.admission.observe(admission_s)
        self.added_ttft.observe(admission_s + first_relay_s)

    def _spec(self, m: RequestMetrics) -> None:
        labels = (self.model_name, m.method)
        self.by_method.labels(*labels).inc()
        if not m.spec_num_drafts:
            return
        self.spec_drafts.labels(*labels).inc(m.spec_num_drafts)
        self.spec_draft_tokens.labels(*labels).inc(m.spec_draft_tokens)
        self.spec_accepted.labels(*labels).inc(m.spec_accepted_tokens)
        for pos, n in enumerate(m.spec_accepted_per_pos):
            if n:
                self.spec_accepted_per_pos.labels(*labels, str(pos)).inc(n)

    def failed(self, request_id: str, reason: str) -> None:
        self.failures.labels(self.model_name, reason).inc()

    def selected(self, record: PerfRecord) -> None:
        self.method_selected.labels(self.model_name, record.method,
                                    str(record.explored).lower()).inc()
        achieved, predicted = record.decode_tokens_per_s, record.predicted_tokens_per_s
        if achieved and predicted:
            self.prediction_error.observe(abs(math.log(predicted / achieved)))

    # -- scraping ---------------------------------------------------------------------------------

    async def poll_workers(self, workers: Sequence[Any], timeout_s: float = 1.0) -> None:
        """Refresh the worker gauges from each worker's `info()`; a worker that does not answer
        in time is left out of this scrape."""

        async def one(w: Any) -> dict[str, Any] | None:
            try:
                return await asyncio.wait_for(w.info.remote(), timeout_s)
            except Exception:  # noqa: BLE001 - a slow or dead worker must not fail the scrape
                return None

        infos = [i for i in await asyncio.gather(*(one(w) for w in workers)) if i is not None]
        if len(infos) < len(workers):
            log.debug("%d of %d workers did not answer the metrics poll",
                      len(workers) - len(infos), len(workers))
        self.waiting.labels(self.model_name).set(sum(i.get("num_waiting", 0) for i in infos))
        self.kv_usage.clear()  # workers that left the set drop out of the gauge
        caches = []
        for i in infos:
            labels = [self.model_name, f"{str(i.get('node_id', ''))[:8]}:{i.get('pid', '?')}",
                      str(i.get("role", "?"))]
            self.kv_usage.labels(*labels).set(float(i.get("kv_usage", 0.0)))
            if i.get("expert_cache"):
                caches.append((labels, i["expert_cache"]))
        self.expert_caches.caches = caches

    def render(self) -> bytes:
        """The Prometheus text exposition of this router's metrics."""
        return generate_latest(self.registry)
