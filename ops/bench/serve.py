"""`baton bench serve`: Baton's gRPC API against `transformers serve`, same model, cores and load.

Baton runs as `baton up` brings it (a prefill and a decode worker, one core and one thread each,
the router in front) unless the address of a running cluster is given; the peer is
`transformers serve` on the same local model directory, pinned to the same two cores with two
threads, same dtype. Both get the same chat prompts (short questions, and some with a few hundred
tokens of notes), the same output lengths with EOS ignored, greedy, as open-loop Poisson load at
rising rates, taking turns at each rate; a system stops after its first rate below the
attainment. SLOs are a multiple of the unloaded TTFT (longest prompt, alone) and TPOT, the larger
of the two systems' figures, so that either can meet them unloaded.

The router's own latency: short requests of one token, one at a time, through the gRPC API and
straight to the decode worker actor over Ray, alternating; the difference of their TTFTs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import yaml
from rich.console import Console
from rich.table import Table

from baton.actors.model_source import load_tokenizer, resolve
from baton.cluster import local
from baton.cluster.controller import get_controller
from baton.errors import ConfigError
from baton.ops.bench.engine import machine_info
from baton.ops.bench.openloop import SLO, goodput, poisson_arrivals, run_record
from baton.ops.bench.pd import probes
from baton.ops.bench.report import run_and_report
from baton.ops.bench.serve_targets import BatonTarget, PeerTarget, Target, router_overhead
from baton.ops.bench.transformers_serve import TransformersServe, free_port
from baton.ops.bench.workload import QUESTIONS, BenchRequest, chat_prompt_ids

log = logging.getLogger(__name__)

RATES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
ATTAINMENT = 0.9
OVERHEAD_REQUESTS = 30
PEER = PeerTarget.name
TARGETS = {"goodput_vs_transformers_serve": 2.0, "router_overhead_ms_p50": 2.0}
# Chat traffic: mostly short questions, some with notes to read (those go to the prefill worker).
LONG_FRACTION = 0.3
LONG_PROMPT = (300, 600)
LONG_OUTPUT = (32, 64)
SHORT_PROMPT = (0, 100)
SHORT_OUTPUT = (16, 48)


def build_requests(tokenizer: Any, n: int, seed: int) -> list[BenchRequest]:
    """`n` chat requests, `LONG_FRACTION` of them (rounded) with notes, in shuffled order; each
    opens with its own ticket line, so no two share a cached prefix past the system prompt.

    The long share is fixed, not drawn, so that every rate brings the same kind of work."""
    rng = random.Random(seed)
    num_long = round(LONG_FRACTION * n)
    kinds = [True] * num_long + [False] * (n - num_long)
    rng.shuffle(kinds)
    out = []
    for i, long in enumerate(kinds):
        prompt, output = ((LONG_PROMPT, LONG_OUTPUT) if long else (SHORT_PROMPT, SHORT_OUTPUT))
        ids = chat_prompt_ids(tokenizer, rng.choice(QUESTIONS), rng.randint(*prompt), rng,
                              header=f"Ticket {seed}-{i}.\n")
        out.append(BenchRequest(ids, rng.randint(*output)))
    return out


def sweep(systems: dict[str, Target], tokenizer: Any, num_requests: int,
          rates: Sequence[float], seed: int,
          say: Callable[[str], None]) -> dict[str, dict[float, dict[str, Any]]]:
    """Each rate gets fresh requests (an earlier rate's prompt would hit the prefix cache), the
    same for every system, on one arrival schedule; a system leaves after a rate it missed."""
    results: dict[str, dict[float, dict[str, Any]]] = {name: {} for name in systems}
    live = list(systems)
    for k, rate in enumerate(sorted(rates)):
        requests = build_requests(tokenizer, num_requests, seed + 1000 * (k + 1))
        arrivals = poisson_arrivals(len(requests), rate, seed + k)
        for name in live if k % 2 == 0 else live[::-1]:  # take turns going first
            system = systems[name]
            assert system.slo is not None
            timings, wall = system.run(requests, arrivals)
            s = run_record(timings, wall, system.slo, requests, LONG_PROMPT[0])
            s["cut_at_slo_deadline"] = len(system.cut)
            s["max_tokens"] = [r.max_tokens for r in requests]
            results[name][rate] = s
            say(f"{name:>18} @ {rate:.2f} req/s: attainment {s['attainment']:.0%}, TTFT p99 "
                f"{s['ttft_p99_s']:.2f} s, TPOT p99 {s['tpot_p99_s'] * 1000:.0f} ms, "
                f"{len(system.cut)} cut")
        live = [n for n in live if results[n][rate]["attainment"] >= ATTAINMENT]
        if not live:
            break
    return results


def decode_worker() -> Any:
    workers = ray.get(get_controller(namespace=local.NAMESPACE).workers.remote())
    for w in workers:
        if w["role"] in ("decode", "both"):
            return w["handle"]
    raise ConfigError("the cluster has no ready decode worker to measure against")


# -- the run --------------------------------------------------------------------------------------


@contextlib.contextmanager
def baton_cluster(model: str, dtype: str, address: str | None) -> Iterator[BatonTarget]:
    """A local cluster brought up for the run (and always down after), or a running one."""
    if address is not None:
        cluster = local.LocalCluster.load()  # its token, and its Ray for the direct calls
        if not ray.is_initialized():
            cluster.connect()
        try:
            yield BatonTarget(address, cluster.token)
        finally:
            ray.shutdown()
        return
    config = local.default_local_config()
    config.model = model
    for pool in config.pools:
        pool.dtype = dtype
    with tempfile.TemporaryDirectory(prefix="baton-bench-") as scratch:
        path = Path(scratch) / "cluster.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        try:
            cluster = local.up(str(path), grpc_port=free_port(), http_port=None)
            yield BatonTarget(cluster.grpc_address, cluster.token)
        finally:
            local.down()


def _calibrate(target: Target, tokenizer: Any, seed: int) -> tuple[float, float]:
    """(TTFT, TPOT) unloaded: best of three fresh longest-kind prompts, 32 tokens each."""
    best_ttft, best_tpot = float("inf"), float("inf")
    for probe in probes(tokenizer, f"Calibration {target.name}", 3, LONG_PROMPT[1], 32, seed):
        (t,), _ = target.run([probe], [0.0])
        best_ttft, best_tpot = min(best_ttft, t.ttft), min(best_tpot, t.tpot or best_tpot)
    return best_ttft, best_tpot


def _warm(target: Target, tokenizer: Any, seed: int) -> None:
    warm = [*probes(tokenizer, f"Warm-up {target.name}", 2, LONG_PROMPT[1], 4, seed),
            *probes(tokenizer, f"Warm-up {target.name} short", 2, 0, 4, seed)]
    target.run(warm, [0.0, 0.0, 0.1, 0.1])


def run(*, model: str = "default", dtype: str = "bfloat16", rates: Sequence[float] = RATES,
        num_requests: int = 16, ttft_scale: float = 3.0, tpot_scale: float = 2.5,
        overhead_requests: int = OVERHEAD_REQUESTS, address: str | None = None,
        peer_continuous_batching: bool = False, seed: int = 0,
        progress: Console | None = None) -> dict[str, Any]:
    """Sweep `rates` through both systems; measure the router's latency; return the report."""
    if (num_requests < 1 or overhead_requests < 1 or not rates or min(rates) <= 0
            or ttft_scale <= 0 or tpot_scale <= 0):
        raise ConfigError("--num-requests, --overhead-requests, --rate and the SLO scales must "
                          "all be positive")
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
            _warm(system, tokenizer, seed)
        solo = {name: _calibrate(s, tokenizer, seed) for name, s in systems.items()}
        slo = SLO(ttft_s=ttft_scale * max(t for t, _ in solo.values()),
                  tpot_s=tpot_scale * max(t for _, t in solo.values()))
        say(f"SLOs: TTFT {slo.ttft_s:.2f} s, TPOT {slo.tpot_s * 1000:.0f} ms (solo: "
            + ", ".join(f"{n} {t:.2f} s / {p * 1000:.0f} ms" for n, (t, p) in solo.items())
            + ")")
        for system in systems.values():
            system.slo = slo
        results = sweep(systems, tokenizer, num_requests, rates, seed, say)
        say(f"router overhead: {overhead_requests} one-token requests per path")
        prompts = [p.prompt_ids for p in probes(tokenizer, "Overhead", 2 * (overhead_requests + 3),
                                                0, 1, seed)]
        overhead = asyncio.run(router_overhead(baton, decode_worker(), prompts))
        checks = {name: s.checks for name, s in systems.items()}
        peer_info = peer_server.describe()
    return _report(source.name, dtype, cores, num_requests, slo, solo, (ttft_scale, tpot_scale),
                   results, overhead, checks, peer_info)


def _report(model: str, dtype: str, cores: list[int], num_requests: int, slo: SLO,
            solo: dict[str, tuple[float, float]], scales: tuple[float, float],
            results: dict[str, dict[float, dict[str, Any]]], overhead: dict[str, Any],
            checks: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    good = {name: goodput(by_rate, ATTAINMENT) for name, by_rate in results.items()}
    ours, theirs = results["baton"], results[PEER]
    rates = [r for by_rate in results.values() for r in by_rate]
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
            "num_requests_per_rate": num_requests, "long_fraction": LONG_FRACTION,
            "long": {"prompt_tokens": LONG_PROMPT, "output_tokens": LONG_OUTPUT},
            "short": {"prompt_tokens": SHORT_PROMPT, "output_tokens": SHORT_OUTPUT},
            "requests": "new chat prompts at every rate, the same for both systems (Baton: "
                        "token ids; the peer: the text they decode to)",
            "arrivals": "Poisson, the same schedule for both", "ignore_eos": True,
            "sampling": "greedy",
            "cut": "a request still running at ttft_slo + (max_tokens - 1) * tpot_slo + 1 s is "
                   "cut there: a certain SLO miss; its TTFT/TPOT are lower bounds",
        },
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": ATTAINMENT,
                "ttft_scale": scales[0], "tpot_scale": scales[1],
                "from": "scale x the larger of the two systems' unloaded figures",
                "solo": {n: {"ttft_s": t, "tpot_s": p} for n, (t, p) in solo.items()}},
        "systems": {name: {"goodput_rps": good[name],
                           # Met the SLOs at the highest rate swept: goodput is a lower bound.
                           "goodput_is_lower_bound": good[name] == max(rates),
                           "rates": {str(r): s for r, s in by_rate.items()}}
                    for name, by_rate in results.items()},
        "checks": checks,
        "router_overhead": overhead,
        "ratios": {
            "goodput_vs_transformers_serve": good["baton"] / good[PEER] if good[PEER] else None,
            "router_overhead_ms_p50": overhead["overhead_ms_p50"],
            "router_overhead_ms_p99": overhead["overhead_ms_p99"],
            "tok_s_vs_transformers_serve_by_rate": {
                str(r): ours[r]["output_tok_s"] / theirs[r]["output_tok_s"] for r in shared},
        },
        "targets": TARGETS,
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    slo = report["slo"]
    table = Table(title=f"baton bench serve: {report['model']} {report['dtype']}, "
                        f"SLO TTFT {slo['ttft_s']:.2f} s / TPOT {slo['tpot_s'] * 1000:.0f} ms",
                  caption="TTFT in s, TPOT in ms")
    for col in ("system", "req/s", "attain", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                "tok/s"):
        table.add_column(col, justify="left" if col == "system" else "right",
                         min_width=18 if col == "system" else None)
    for name, system in report["systems"].items():
        for rate, s in system["rates"].items():
            table.add_row(name, rate, f"{s['attainment']:.0%}", f"{s['ttft_p50_s']:.2f}",
                          f"{s['ttft_p99_s']:.2f}", f"{s['tpot_p50_s'] * 1000:.0f}",
                          f"{s['tpot_p99_s'] * 1000:.0f}", f"{s['output_tok_s']:.1f}")
    console.print(table)
    for name, system in report["systems"].items():
        at_least = "at least " if system["goodput_is_lower_bound"] else ""
        console.print(f"goodput {name}: {at_least}{system['goodput_rps']:.2f} req/s")
    o = report["router_overhead"]
    console.print(f"TTFT through the router {o['router_ttft_ms_p50']:.2f} ms p50 / "
                  f"{o['router_ttft_ms_p99']:.2f} ms p99, straight to the worker "
                  f"{o['direct_ttft_ms_p50']:.2f} / {o['direct_ttft_ms_p99']:.2f} ms")
    for name, value in report["ratios"].items():
        if not isinstance(value, dict):
            shown = "-" if value is None else f"{value:.2f}"
            target = report["targets"].get(name)
            console.print(f"{name}: {shown}" + (f" (target {target})" if target else ""))
    bad = {n: c for n, c in report["checks"].items()
           if c["short_outputs"] or c["prompt_token_mismatches"]}
    if bad:
        console.print(f"[yellow]not every request did the same work: {bad}[/]")


def _exit_on_sigterm() -> None:
    # The servers this run started are stopped on the way out, also when it is told to stop.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def main(*, json_path: str | None = None, **kw: Any) -> dict[str, Any]:
    """Run the benchmark, write the JSON report to `json_path` (if given), print a table."""
    _exit_on_sigterm()
    return run_and_report(lambda progress: run(progress=progress, **kw), print_report, json_path)
