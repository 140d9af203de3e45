"""`baton bench pd`: disaggregated prefill/decode against colocated workers, same cores, same load.

Two systems on this machine's first two cores, both up for the whole run and driven through the
same dispatcher: colocated (two `both` workers, one core each, every prompt prefilled where it
decodes) and disaggregated (one prefill worker on one core, one decode worker on the other; long
prompts prefilled remotely and their KV pushed over the gRPC link, short ones prefilled on the
decode worker). A mixed open-loop workload (Poisson arrivals; long prompts with long outputs among
short chats) runs at rising rates, the systems taking turns at each rate (`sweep`). SLOs are set
from the machine itself: a multiple of one request's TTFT (the longest prompt, alone) and TPOT
(alone), both measured on the colocated system.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

import ray
from rich.console import Console

from baton.actors.model_source import load_tokenizer, resolve
from baton.cluster.config import ClusterConfig, PoolConfig
from baton.cluster.pools import Pools, start_pools
from baton.cluster.ray_start import init_local
from baton.errors import ConfigError
from baton.ops.bench import sweep, worker_load
from baton.ops.bench.machine import machine_info
from baton.ops.bench.openloop import SLO, run_open_loop
from baton.ops.bench.report import run_and_report
from baton.ops.bench.workload import BenchRequest, RequestTiming
from baton.router.dispatch import Dispatcher
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

RATES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
LOAD = sweep.MixedLoad(long_prompt=(600, 1000), long_output=(64, 128))
# Prompts with fewer uncached tokens stay on the decode worker (every short prompt does).
PREFILL_THRESHOLD = 256
SYSTEMS = ("colocated", "disaggregated")


def cluster_configs(model: str, dtype: str, cores: Sequence[int]) -> dict[str, ClusterConfig]:
    def pool(name: str, role: str, replicas: int, pinned: list[int]) -> PoolConfig:
        return PoolConfig(name=name, role=role, replicas=replicas, num_cpus=1, cpu_cores=pinned,
                          dtype=dtype)

    a, b = cores
    return {
        "colocated": ClusterConfig(model=model, prefill_threshold=PREFILL_THRESHOLD,
                                   pools=[pool("colocated", "both", 2, [a, b])]),
        "disaggregated": ClusterConfig(model=model, prefill_threshold=PREFILL_THRESHOLD,
                                       pools=[pool("prefill", "prefill", 1, [a]),
                                              pool("decode", "decode", 1, [b])]),
    }


class System:
    """One system under test: its pools and the dispatcher in front of them."""

    def __init__(self, name: str, pools: Pools):
        self.name = name
        self.pools = pools
        self.dispatcher = Dispatcher.for_pools(pools)
        self._runs = 0
        self._loads: list[dict[str, Any]] = []  # the last run's, per worker (`worker_load`)

    @property
    def workers(self) -> list[Any]:
        return [w for ws in self.pools.workers.values() for w in ws]

    def run(self, requests: Sequence[BenchRequest],
            arrivals: Sequence[float]) -> tuple[list[RequestTiming], float]:
        self._runs += 1
        tag = f"{self.name}-{self._runs}"

        def send(i: int, req: BenchRequest):
            params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True)
            return self.dispatcher.generate(f"{tag}-{i}", req.prompt_ids, params)

        timings, wall, self._loads = worker_load.during(
            self.workers, lambda: asyncio.run(run_open_loop(send, requests, arrivals)))
        return timings, wall

    def notes(self) -> dict[str, Any]:
        return {"workers": self._loads}

    def health(self) -> dict[str, Any]:
        """Every worker's `info()` and any broken KV-block invariant, after the run."""
        return {"block_violations": [v for vs in ray.get([w.block_violations.remote()
                                                          for w in self.workers]) for v in vs],
                "workers": ray.get([w.info.remote() for w in self.workers])}


def run(*, model: str = "default", dtype: str = "bfloat16", rates: Sequence[float] = RATES,
        num_requests: int = 32, ttft_scale: float = 3.0, tpot_scale: float = 2.5, seed: int = 0,
        progress: Console | None = None) -> dict[str, Any]:
    """Sweep `rates` for both systems (each stops after its first rate below the attainment)."""
    sweep.check_args(num_requests, rates, ttft_scale, tpot_scale)
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        raise ConfigError("bench pd needs two CPU cores (one per worker)")
    say = progress.print if progress else log.info
    source = resolve(model)
    tokenizer = load_tokenizer(source)
    init_local(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR,
               log_to_driver=False)
    try:
        say(f"starting both systems on cores {cores} ({source.name}, {dtype})")
        systems = {name: System(name, start_pools(cfg))
                   for name, cfg in cluster_configs(model, dtype, cores).items()}
        for system in systems.values():
            sweep.warm(system, tokenizer, LOAD, seed)
        solo = sweep.calibrate(systems["colocated"], tokenizer, LOAD, seed)
        slo = SLO(ttft_s=ttft_scale * solo[0], tpot_s=tpot_scale * solo[1])
        say(f"SLOs: TTFT {slo.ttft_s:.2f} s, TPOT {slo.tpot_s * 1000:.0f} ms "
            f"(solo {solo[0]:.2f} s, {solo[1] * 1000:.0f} ms)")
        results = sweep.run(systems, tokenizer, LOAD, num_requests, rates, slo, seed, say)
        health = {name: s.health() for name, s in systems.items()}
    finally:
        ray.shutdown()
    return _report(source.name, dtype, num_requests, slo, solo, (ttft_scale, tpot_scale),
                   results, health)


def _report(model: str, dtype: str, num_requests: int, slo: SLO, solo: tuple[float, float],
            scales: tuple[float, float], results: sweep.Results,
            health: dict[str, Any]) -> dict[str, Any]:
    systems = sweep.systems_report(results)
    good = {name: s["goodput_rps"] for name, s in systems.items()}
    co, pd = results["colocated"], results["disaggregated"]
    shared = [r for r in co if r in pd]
    # TPOT compared at the highest load both ran that colocated served within its SLOs.
    at = max([r for r in shared if r <= good["colocated"]] or [min(shared)])
    return {
        "machine": machine_info(1),
        "model": model,
        "dtype": dtype,
        "workload": {
            **LOAD.describe(num_requests),
            "requests": "new prompts at every rate (no prefix-cache carry-over), the same for "
                        "both systems",
            "prefill_threshold": PREFILL_THRESHOLD,
        },
        "slo": {**sweep.slo_report(slo, scales, {"colocated": solo}),
                "from": "scale x the colocated system's unloaded figures"},
        "systems": systems,
        "health": health,
        "ratios": {
            "goodput_pd_vs_colocated": sweep.ratio(good["disaggregated"], good["colocated"]),
            "tpot_p99_pd_vs_colocated": sweep.ratio(pd[at]["tpot_p99_s"], co[at]["tpot_p99_s"]),
            "tpot_p99_rate": at,
            "tpot_p99_pd_vs_colocated_by_rate": {
                str(r): sweep.ratio(pd[r]["tpot_p99_s"], co[r]["tpot_p99_s"]) for r in shared},
        },
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    sweep.print_table(report, console, "pd")
    bad = {n: h["block_violations"] for n, h in report["health"].items() if h["block_violations"]}
    if bad:
        console.print(f"[red]block invariant broken after the run: {bad}[/]")


def main(*, json_path: str | None = None, **kw: Any) -> dict[str, Any]:
    """Run the benchmark, write the JSON report to `json_path` (if given), print a table."""
    return run_and_report(lambda progress: run(progress=progress, **kw), print_report, json_path)
