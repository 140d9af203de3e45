"""`baton bench pd`: disaggregated prefill/decode against colocated workers, same cores, same load.

Two systems on this machine's first two cores, both up for the whole run and driven through the
same dispatcher: colocated (two `both` workers, one core each, every prompt prefilled where it
decodes) and disaggregated (one prefill worker on one core, one decode worker on the other; long
prompts prefilled remotely and their KV pushed over the gRPC link, short ones prefilled on the
decode worker). A mixed open-loop workload (Poisson arrivals; long prompts with long outputs among
short chats) runs at rising rates, the systems taking turns at each rate. SLOs are set from the
machine itself: a multiple of one request's TTFT (the longest prompt, alone) and TPOT (alone).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from baton.actors.model_source import load_tokenizer, resolve
from baton.cluster.config import ClusterConfig, PoolConfig
from baton.cluster.pools import Pools, start_pools
from baton.errors import ConfigError
from baton.ops.bench.engine import machine_info
from baton.ops.bench.openloop import SLO, goodput, poisson_arrivals, run_open_loop, run_record
from baton.ops.bench.report import run_and_report
from baton.ops.bench.workload import QUESTIONS, BenchRequest, chat_prompt_ids
from baton.router.dispatch import Dispatcher
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

RATES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
ATTAINMENT = 0.9
LONG_FRACTION = 0.3
LONG_PROMPT = (600, 1000)
LONG_OUTPUT = (64, 128)
SHORT_PROMPT = (0, 100)
SHORT_OUTPUT = (16, 48)
# Prompts with fewer uncached tokens stay on the decode worker (every short prompt does).
PREFILL_THRESHOLD = 256
SYSTEMS = ("colocated", "disaggregated")


def build_requests(tokenizer, n: int, seed: int) -> list[BenchRequest]:
    """`n` requests, `LONG_FRACTION` of them long prompts with long outputs; each prompt opens
    with its own ticket line, so no two share a cached prefix past the system prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = rng.random() < LONG_FRACTION
        prompt_range, output_range = (LONG_PROMPT, LONG_OUTPUT) if long else (SHORT_PROMPT,
                                                                              SHORT_OUTPUT)
        ids = chat_prompt_ids(tokenizer, rng.choice(QUESTIONS), rng.randint(*prompt_range), rng,
                              header=f"Ticket {seed}-{i}.\n")
        out.append(BenchRequest(ids, rng.randint(*output_range)))
    return out


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


def _params(req: BenchRequest) -> SamplingParams:
    return SamplingParams(max_tokens=req.max_tokens, ignore_eos=True)


class System:
    """One system under test: its pools and the dispatcher in front of them."""

    def __init__(self, name: str, pools: Pools):
        self.name = name
        self.pools = pools
        self.dispatcher = Dispatcher.for_pools(pools)
        self._runs = 0

    @property
    def workers(self) -> list[Any]:
        return [w for ws in self.pools.workers.values() for w in ws]

    def run(self, requests: Sequence[BenchRequest], arrivals: Sequence[float]):
        self._runs += 1
        tag = f"{self.name}-{self._runs}"

        def send(i: int, req: BenchRequest):
            return self.dispatcher.generate(f"{tag}-{i}", req.prompt_ids, _params(req))

        return asyncio.run(run_open_loop(send, requests, arrivals))

    def info(self) -> list[dict[str, Any]]:
        return ray.get([w.info.remote() for w in self.workers])

    def violations(self) -> list[str]:
        return [v for vs in ray.get([w.block_violations.remote() for w in self.workers])
                for v in vs]


def probes(tokenizer, tag: str, n: int, prompt_tokens: int, max_tokens: int,
           seed: int) -> list[BenchRequest]:
    """`n` prompts of the workload's kind that share no cached prefix with it or each other."""
    rng = random.Random(f"{tag}-{seed}")
    return [BenchRequest(chat_prompt_ids(tokenizer, rng.choice(QUESTIONS), prompt_tokens, rng,
                                         header=f"{tag} {seed}-{i}.\n"), max_tokens)
            for i in range(n)]


def calibrate(system: System, tokenizer, seed: int) -> tuple[float, float]:
    """(TTFT, TPOT) of a longest-kind prompt alone on one worker: the unloaded reference.

    Best of three fresh prompts (none of them in any prefix cache)."""
    best_ttft, best_tpot = float("inf"), float("inf")
    for probe in probes(tokenizer, "Calibration", 3, LONG_PROMPT[1], 32, seed):
        (t,), _ = system.run([probe], [0.0])
        best_ttft, best_tpot = min(best_ttft, t.ttft), min(best_tpot, t.tpot or best_tpot)
    return best_ttft, best_tpot


def _warm(systems: dict[str, System], tokenizer, seed: int) -> None:
    # Every worker runs long and short prompts once, through its own path.
    for name, system in systems.items():
        warm = [*probes(tokenizer, f"Warm-up {name}", 2, LONG_PROMPT[1], 4, seed),
                *probes(tokenizer, f"Warm-up {name} short", 2, 0, 4, seed)]
        system.run(warm, [0.0, 0.0, 0.1, 0.1])


def run(*, model: str = "default", dtype: str = "bfloat16", rates: Sequence[float] = RATES,
        num_requests: int = 32, ttft_scale: float = 3.0, tpot_scale: float = 2.5, seed: int = 0,
        progress: Console | None = None) -> dict[str, Any]:
    """Sweep `rates` for both systems (each stops after its first rate below the attainment)."""
    if num_requests < 1 or not rates or min(rates) <= 0 or ttft_scale <= 0 or tpot_scale <= 0:
        raise ConfigError("--num-requests, --rates, and the SLO scales must all be positive")
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        raise ConfigError("bench pd needs two CPU cores (one per worker)")
    say = progress.print if progress else log.info
    source = resolve(model)
    tokenizer = load_tokenizer(source)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        say(f"starting both systems on cores {cores} ({source.name}, {dtype})")
        systems = {name: System(name, start_pools(cfg))
                   for name, cfg in cluster_configs(model, dtype, cores).items()}
        _warm(systems, tokenizer, seed)
        solo_ttft, solo_tpot = calibrate(systems["colocated"], tokenizer, seed)
        slo = SLO(ttft_s=ttft_scale * solo_ttft, tpot_s=tpot_scale * solo_tpot)
        say(f"SLOs: TTFT {slo.ttft_s:.2f} s, TPOT {slo.tpot_s * 1000:.0f} ms "
            f"(solo {solo_ttft:.2f} s, {solo_tpot * 1000:.0f} ms)")
        results = _sweep(systems, tokenizer, num_requests, sorted(rates), slo, seed, say)
        health = {name: {"block_violations": s.violations(), "workers": s.info()}
                  for name, s in systems.items()}
    finally:
        ray.shutdown()
    return _report(source.name, dtype, num_requests, slo, (solo_ttft, solo_tpot),
                   (ttft_scale, tpot_scale), results, health)


def _sweep(systems: dict[str, System], tokenizer, num_requests: int, rates: list[float],
           slo: SLO, seed: int, say) -> dict[str, dict[float, dict[str, Any]]]:
    """Each rate gets requests of its own (a prompt seen at an earlier rate would be a prefix
    cache hit); both systems get the same ones, on the same arrival schedule."""
    results: dict[str, dict[float, dict[str, Any]]] = {name: {} for name in systems}
    live = list(systems)
    for k, rate in enumerate(rates):
        requests = build_requests(tokenizer, num_requests, seed + 1000 * (k + 1))
        arrivals = poisson_arrivals(len(requests), rate, seed + k)
        order = live if k % 2 == 0 else live[::-1]  # take turns going first
        for name in order:
            timings, wall = systems[name].run(requests, arrivals)
            summary = run_record(timings, wall, slo, requests, LONG_PROMPT[0])
            results[name][rate] = summary
            say(f"{name:>13} @ {rate:.2f} req/s: attainment {summary['attainment']:.0%}, "
                f"TTFT p99 {summary['ttft_p99_s']:.2f} s, "
                f"TPOT p99 {summary['tpot_p99_s'] * 1000:.0f} ms")
        live = [n for n in live if results[n][rate]["attainment"] >= ATTAINMENT]
        if not live:
            break
    return results


def _report(model: str, dtype: str, num_requests: int, slo: SLO,
            solo: tuple[float, float], scales: tuple[float, float],
            results: dict[str, dict[float, dict[str, Any]]],
            health: dict[str, Any]) -> dict[str, Any]:
    good = {name: goodput(by_rate, ATTAINMENT) for name, by_rate in results.items()}
    co, pd = results["colocated"], results["disaggregated"]
    shared = [r for r in co if r in pd]
    # TPOT compared at the highest load both ran that colocated served within its SLOs.
    at = max([r for r in shared if r <= good["colocated"]] or [min(shared)])
    return {
        "machine": machine_info(1),
        "model": model,
        "dtype": dtype,
        "workload": {
            "num_requests_per_rate": num_requests, "long_fraction": LONG_FRACTION,
            "long": {"prompt_tokens": LONG_PROMPT, "output_tokens": LONG_OUTPUT},
            "short": {"prompt_tokens": SHORT_PROMPT, "output_tokens": SHORT_OUTPUT},
            "requests": "new prompts at every rate (no prefix-cache carry-over), the same for "
                        "both systems",
            "arrivals": "Poisson", "ignore_eos": True, "sampling": "greedy",
            "prefill_threshold": PREFILL_THRESHOLD,
        },
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": ATTAINMENT,
                "solo_ttft_s": solo[0], "solo_tpot_s": solo[1],
                "ttft_scale": scales[0], "tpot_scale": scales[1]},
        "systems": {name: {"goodput_rps": good[name],
                           "rates": {str(r): s for r, s in by_rate.items()}}
                    for name, by_rate in results.items()},
        "health": health,
        "ratios": {
            "goodput_pd_vs_colocated": (good["disaggregated"] / good["colocated"]
                                        if good["colocated"] else None),
            "tpot_p99_pd_vs_colocated": pd[at]["tpot_p99_s"] / co[at]["tpot_p99_s"],
            "tpot_p99_rate": at,
            "tpot_p99_pd_vs_colocated_by_rate": {
                str(r): pd[r]["tpot_p99_s"] / co[r]["tpot_p99_s"] for r in shared},
        },
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    slo = report["slo"]
    table = Table(title=f"baton bench pd: {report['model']} {report['dtype']}, "
                        f"SLO TTFT {slo['ttft_s']:.2f} s / TPOT {slo['tpot_s'] * 1000:.0f} ms",
                  caption="TTFT in s, TPOT in ms")
    for col in ("system", "req/s", "attain", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                "tok/s"):
        table.add_column(col, justify="right" if col != "system" else "left")
    for name, system in report["systems"].items():
        for rate, s in system["rates"].items():
            table.add_row(name, rate, f"{s['attainment']:.0%}", f"{s['ttft_p50_s']:.2f}",
                          f"{s['ttft_p99_s']:.2f}", f"{s['tpot_p50_s'] * 1000:.0f}",
                          f"{s['tpot_p99_s'] * 1000:.0f}", f"{s['output_tok_s']:.1f}")
    console.print(table)
    for name, system in report["systems"].items():
        console.print(f"goodput {name}: {system['goodput_rps']:.2f} req/s")
    for name, value in report["ratios"].items():
        if not isinstance(value, dict):
            console.print(f"{name}: {'-' if value is None else f'{value:.2f}'}")
    bad = {n: h["block_violations"] for n, h in report["health"].items() if h["block_violations"]}
    if bad:
        console.print(f"[red]block invariant broken after the run: {bad}[/]")


def main(*, json_path: str | None = None, **kw: Any) -> dict[str, Any]:
    """Run the benchmark, write the JSON report to `json_path` (if given), print a table."""
    return run_and_report(lambda progress: run(progress=progress, **kw), print_report, json_path)
