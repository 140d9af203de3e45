"""`baton bench serve`: Baton's gRPC API against `transformers serve`, same model, cores and load.

Baton runs as `baton up` brings it (a prefill and a decode worker, one core and one thread each,
the router in front) unless the address of a running cluster is given; the peer is
`transformers serve` on the same local model directory, pinned to the same two cores with two
threads, same dtype. Both get the same chat prompts (short questions, and some with a few hundred
tokens of notes), the same output lengths with EOS ignored, greedy, as open-loop Poisson load at
rising rates, taking turns at each rate; a system stops after its first rate below the
attainment. SLOs are a multiple of the unloaded TTFT (longest prompt, alone) and TPOT, the larger
of the two systems' figures, so that either can meet them unloaded.

A system that misses the SLOs even at the lowest rate is run again at half that rate, and half
again, down to `min_rate`, so that its goodput is a rate rather than zero (and the goodput ratio a
number).

The router's own latency, as the router times itself (its `baton:router_*_seconds` histograms,
scraped from `/metrics` before and after): over short requests of one token, one at a time, and
over the whole sweep. Beside it, the older estimate from outside: the same one-token requests
through the gRPC API and straight to the decode worker actor over Ray, alternating, and the
difference of their TTFTs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import yaml
from rich.console import Console

from baton.actors.model_source import load_tokenizer, resolve
from baton.cluster import local
from baton.cluster.config import POOL_LEVEL
from baton.cluster.lifecycle import get_controller
from baton.errors import ConfigError
from baton.ops.bench import sweep
from baton.ops.bench.machine import machine_info
from baton.ops.bench.openloop import SLO
from baton.ops.bench.report import run_and_report
from baton.ops.bench.router_time import summary
from baton.ops.bench.serve_targets import BatonTarget, PeerTarget, Target, router_overhead
from baton.ops.bench.transformers_serve import TransformersServe

log = logging.getLogger(__name__)

RATES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MIN_RATE = 0.0625  # the lowest rate a system that misses at RATES[0] is tried at
OVERHEAD_REQUESTS = 30
PEER = PeerTarget.name
TARGETS = {"goodput_vs_transformers_serve": 2.0, "router_overhead_ms_p50": 1.0}
# Chat traffic: mostly short questions, some with notes to read (those go to the prefill worker).
LOAD = sweep.MixedLoad(long_prompt=(300, 600), long_output=(32, 64))


def cluster_workers() -> list[dict[str, Any]]:
    """The local cluster's ready workers as its controller lists them (role, handle, ...)."""
    return ray.get(get_controller(namespace=local.NAMESPACE).workers.remote())


def decode_worker() -> Any:
    for w in cluster_workers():
        if w["role"] in ("decode", "both"):
            return w["handle"]
    raise ConfigError("the cluster has no ready decode worker to measure against")


# -- the run --------------------------------------------------------------------------------------


def _metrics_url(cluster: local.LocalCluster) -> str | None:
    return f"http://{cluster.http_address}/metrics" if cluster.http_address else None


@contextlib.contextmanager
def baton_cluster(model: str, dtype: str, address: str | None) -> Iterator[BatonTarget]:
    """A local cluster brought up for the run (and always down after), or a running one."""
    if address is not None:
        cluster = local.LocalCluster.load()  # its token, and its Ray for the direct calls
        if not ray.is_initialized():
            cluster.connect()
        try:
            yield BatonTarget(address, cluster.token, _metrics_url(cluster), cluster_workers)
        finally:
            ray.shutdown()
        return
    config = local.default_local_config()
    config.model = model
    for pool in config.pools:
        pool.dtype = dtype
    with tempfile.TemporaryDirectory(prefix="baton-bench-") as scratch:
        path = Path(scratch) / "cluster.yaml"
        # A pool's engine echoes the pool's model, dtype and device; a config sets them once.
        dumped = config.model_dump(mode="json",
                                   exclude={"pools": {"__all__": {"engine": set(POOL_LEVEL)}}})
        path.write_text(yaml.safe_dump(dumped))
        try:
            # The HTTP front end serves the router's /metrics, where it times itself.
            cluster = local.up(str(path), grpc_port=0, http_port=0)
            yield BatonTarget(cluster.grpc_address, cluster.token, _metrics_url(cluster),
                              cluster_workers)
        finally:
            local.down()


def run(*, model: str = "default", dtype: str = "bfloat16", rates: Sequence[float] = RATES,
        num_requests: int = 16, ttft_scale: float = 3.0, tpot_scale: float = 2.5,
        overhead_requests: int = OVERHEAD_REQUESTS, min_rate: float = MIN_RATE,
        address: str | None = None,
        peer_continuous_batching: bool = False, seed: int = 0,
        progress: Console | None = None) -> dict[str, Any]:
    """Sweep `rates` through both systems; measure the router's latency; return the report."""
    sweep.check_args(num_requests, rates, ttft_scale, tpot_scale)
    if overhead_requests < 1:
        raise ConfigError(f"--overhead-requests must be positive, got {overhead_requests}")
    if not 0 < min_rate <= min(rates):
        raise ConfigError(f"--min-rate must be positive and at most the lowest --rate, got "
                          f"{min_rate}")
    cores = sorted(os.sched_getaffinity(0))[:2]
    say = progress.print if progress else log.info
    source = resolve(model)
    if source.path is None:
        raise ConfigError(f"{model!r} has no model directory for transformers serve to load")
    tokenizer = load_tokenizer(source)
    peer_server = TransformersServe(Path(source.path), dtype=dtype, cores=cores,
                                    continuous_batching=peer_continuous_batching)
    say(f"starting Baton and transformers serve on cores {cores} ({source.name}, {dtype})")
    with baton_cluster(model, dtype, address) as baton, peer_server:
        systems: dict[str, Target] = {"baton": baton, PEER: PeerTarget(peer_server, tokenizer)}
        for system in systems.values():
            sweep.warm(system, tokenizer, LOAD, seed)
        solo = {name: sweep.calibrate(s, tokenizer, LOAD, seed) for name, s in systems.items()}
        slo = SLO(ttft_s=ttft_scale * max(t for t, _ in solo.values()),
                  tpot_s=tpot_scale * max(t for _, t in solo.values()))
        say(f"SLOs: TTFT {slo.ttft_s:.2f} s, TPOT {slo.tpot_s * 1000:.0f} ms (solo: "
            + ", ".join(f"{n} {t:.2f} s / {p * 1000:.0f} ms" for n, (t, p) in solo.items())
            + ")")
        for system in systems.values():
            system.slo = slo
        before = asyncio.run(baton.router_time())
        results = sweep.run(systems, tokenizer, LOAD, num_requests, rates, slo, seed, say)
        after = asyncio.run(baton.router_time())
        sweep.extend_down(systems, results, tokenizer, LOAD, num_requests, slo, seed, say,
                          min_rate)
        say(f"router overhead: {overhead_requests} one-token requests per path")
        prompts = [p.prompt_ids for p in sweep.probes(tokenizer, "Overhead",
                                                      2 * (overhead_requests + 3), 0, 1, seed)]
        overhead = asyncio.run(router_overhead(baton, decode_worker(), prompts))
        overhead["in_router_over_sweep"] = (summary(before, after) if before and after
                                            else None)
        checks = {name: s.checks for name, s in systems.items()}
        peer_info = peer_server.describe()
    return _report(source.name, dtype, cores, num_requests, slo, solo, (ttft_scale, tpot_scale),
                   results, overhead, checks, peer_info)


def _report(model: str, dtype: str, cores: list[int], num_requests: int, slo: SLO,
            solo: dict[str, tuple[float, float]], scales: tuple[float, float],
            results: sweep.Results, overhead: dict[str, Any], checks: dict[str, Any],
            peer: dict[str, Any]) -> dict[str, Any]:
    systems = sweep.systems_report(results)
    ours, theirs = results["baton"], results[PEER]
    shared = [r for r in ours if r in theirs]
    return {
        "machine": machine_info(len(cores)),
        "model": model,
        "dtype": dtype,
        "cores": cores,
        "systems_setup": {
            "baton": {"api": "gRPC baton.v1 Generate (token ids)", "workers":
                      "one prefill and one decode worker, one core and one thread each"},
            PEER: peer,
        },
        "workload": {
            **LOAD.describe(num_requests),
            "requests": "new chat prompts at every rate, the same for both systems (Baton: "
                        "token ids; the peer: the text they decode to)",
            "cut": "a request still running at ttft_slo + (max_tokens - 1) * tpot_slo + 1 s is "
                   "cut there: a certain SLO miss; its TTFT/TPOT are lower bounds",
        },
        "slo": {**sweep.slo_report(slo, scales, solo),
                "from": "scale x the larger of the two systems' unloaded figures"},
        "systems": systems,
        "checks": checks,
        "router_overhead": overhead,
        "ratios": {
            "goodput_vs_transformers_serve": sweep.ratio(systems["baton"]["goodput_rps"],
                                                   systems[PEER]["goodput_rps"]),
            "router_overhead_ms_p50": overhead["overhead_ms_p50"],
            "router_overhead_ms_p99": overhead["overhead_ms_p99"],
            "router_overhead_ttft_difference_ms_p50": overhead["ttft_difference_ms_p50"],
            "tok_s_vs_transformers_serve_by_rate": {
                str(r): sweep.ratio(ours[r]["output_tok_s"], theirs[r]["output_tok_s"])
                for r in shared},
        },
        "targets": TARGETS,
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    sweep.print_table(report, console, "serve")
    o = report["router_overhead"]
    for label, phases in (("one at a time", o.get("in_router")),
                          ("over the sweep", o.get("in_router_over_sweep"))):
        if phases:
            console.print(f"router's own time, {label}: " + ", ".join(
                f"{name} {_ms(p['p50_ms'])} / {_ms(p['p99_ms'])} ms p50/p99 ({p['count']})"
                for name, p in phases.items()))
    console.print(f"TTFT through the router {o['router_ttft_ms_p50']:.2f} ms p50 / "
                  f"{o['router_ttft_ms_p99']:.2f} ms p99, straight to the worker "
                  f"{o['direct_ttft_ms_p50']:.2f} / {o['direct_ttft_ms_p99']:.2f} ms")
    bad = {n: c for n, c in report["checks"].items()
           if c["short_outputs"] or c["prompt_token_mismatches"]}
    if bad:
        console.print(f"[yellow]not every request did the same work: {bad}[/]")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _exit_on_sigterm() -> None:
    # The servers this run started are stopped on the way out, also when it is told to stop.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def main(*, json_path: str | None = None, **kw: Any) -> dict[str, Any]:
    """Run the benchmark, write the JSON report to `json_path` (if given), print a table."""
    _exit_on_sigterm()
    return run_and_report(lambda progress: run(progress=progress, **kw), print_report, json_path)
