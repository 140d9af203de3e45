"""`baton bench actor`: one request's TPOT through a Ray worker actor against its engine alone.

Both systems run the same model, dtype and engine options with one torch thread on the same single
core: the engine alone steps in this process (its thread pinned to that core), the worker actor
is pinned to it the way a pool with `cpu_cores` pins a replica. One request at a time (batch 1),
the systems taking turns, each repeat a new prompt of the same length with the same output length
(EOS ignored). TPOT is what the caller sees: from the first token's arrival to the last's, over the
tokens after the first. For the actor path the report also says where a token's time went (per
output token, the prompts' steps included): the engine thread's step (its forward pass within it),
the loop's work between steps, the CPU time of the engine thread and of the actor's other threads
(Ray's, the event loop's), and the delivery of the last token to the caller (its arrival here
minus the engine's finish time; both read `time.monotonic`, one clock for all processes on the
machine).
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from baton.actors.engine import DTYPES, Engine
from baton.actors.engine_loop import LoopTimings
from baton.cluster.config import ClusterConfig, PoolConfig
from baton.cluster.pools import start_pools
from baton.cluster.ray_start import init_local
from baton.errors import ConfigError
from baton.ops.bench.machine import OtherCPUBusy, machine_info, warn_if_busy
from baton.ops.bench.report import ms, run_and_report
from baton.outputs import RequestOutput
from baton.router.worker_streams import open_stream
from baton.sampling import SamplingParams
from baton.stats import percentile, tpot

log = logging.getLogger(__name__)

TARGET = 1.15  # the actor's TPOT should stay within this multiple of the engine's
LOOP_FIELDS = ("steps", "step_s", "forward_s", "calls_s", "deliver_s", "cpu_s", "process_cpu_s")


@dataclass(slots=True)
class Run:
    """One request as its caller saw it: when each stream item arrived (time.monotonic) and how
    many tokens it carried, and its final output."""

    arrivals: list[tuple[float, int]]
    final: RequestOutput

    @property
    def tokens(self) -> int:
        return len(self.final.token_ids)

    @property
    def tpot(self) -> float | None:
        got = [t for t, n in self.arrivals if n]
        return tpot(got[0], got[-1], self.tokens) if got else None


def _collect(outputs: Iterator[RequestOutput]) -> Run:
    arrivals, final = [], None
    for out in outputs:
        arrivals.append((time.monotonic(), len(out.delta_token_ids)))
        final = out
    if final is None or not final.finished:
        raise RuntimeError("a request's stream ended before its final output")
    return Run(arrivals, final)


@contextmanager
def _pinned(core: int) -> Iterator[None]:
    """Pin the calling thread (and so a one-thread torch's work) to `core` meanwhile."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class EngineAlone:
    """The engine stepped by its caller: the baseline with nothing between engine and caller."""

    def __init__(self, model: str, dtype: str, core: int):
        self.core = core
        with _pinned(core):
            self.engine = Engine(model=model, dtype=dtype, num_threads=1)
        self.timings = LoopTimings()  # its steps, counted as the worker's engine loop counts them

    def generate(self, rid: str, prompt: list[int], params: SamplingParams) -> Run:
        engine = self.engine
        engine.add_request(prompt, params, rid)

        def outputs() -> Iterator[RequestOutput]:
            while engine.has_unfinished():
                yield from (o for o in self.timings.step(engine) if o.request_id == rid)

        with _pinned(self.core):
            return _collect(outputs())


class WorkerActor:
    """A `both` worker actor pinned to one core, as a pool with `cpu_cores` starts it."""

    def __init__(self, model: str, dtype: str, core: int):
        pool = PoolConfig(name="actor", role="both", num_cpus=1, cpu_cores=[core], dtype=dtype)
        self.pools = start_pools(ClusterConfig(model=model, pools=[pool]))
        (self.worker,) = self.pools.workers["actor"]

    def loop_timings(self) -> dict[str, float]:
        """The engine loop's `LoopTimings`, and the whole actor process's CPU seconds."""
        info = ray.get(self.worker.info.remote())
        return {**info["loop_timings"], "process_cpu_s": info["process_cpu_s"]}

    def generate(self, rid: str, prompt: list[int], params: SamplingParams) -> Run:
        # The router's call (`Worker.stream`), outputs pickled.
        stream = open_stream(self.worker, rid, prompt, params)
        return _collect(pickle.loads(ray.get(ref)) for ref in stream)


def _prompt(seed: int, length: int, vocab: int) -> list[int]:
    """Token ids unlike any other repeat's (no prefix-cache hits), the same length each time."""
    return [(seed * 7919 + i * 104729) % (vocab - 1) + 1 for i in range(length)]


def run(*, model: str = "default", dtype: str = "bfloat16", repeats: int = 8,
        max_tokens: int = 64, prompt_tokens: int = 32, core: int | None = None,
        progress: Console | None = None) -> dict[str, Any]:
    """Interleave `repeats` batch-1 requests on each system and return the JSON report."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if repeats < 1 or max_tokens < 2 or prompt_tokens < 1:
        raise ConfigError("--repeats and --prompt-tokens must be >= 1, --max-tokens >= 2")
    cores = sorted(os.sched_getaffinity(0))
    core = cores[-1] if core is None else core
    if core not in cores:
        raise ConfigError(f"--core {core} is not one this process may run on ({cores})")
    say = progress.print if progress else log.info
    say(f"loading {model} ({dtype}, one thread on core {core}) for the engine alone")
    alone = EngineAlone(model, dtype, core)
    vocab = alone.engine.vocab_size
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    init_local(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR,
               log_to_driver=False)
    try:
        say("starting the worker actor")
        actor = WorkerActor(model, dtype, core)
        systems: dict[str, Any] = {"engine": alone, "actor": actor}
        warm = SamplingParams(max_tokens=4, ignore_eos=True)
        for name, system in systems.items():
            system.generate(f"warm-{name}", _prompt(10_000, prompt_tokens, vocab), warm)
        runs: dict[str, list[Run]] = {name: [] for name in systems}
        alone.timings = LoopTimings()
        loop_before = actor.loop_timings()
        others = OtherCPUBusy()
        for i in range(repeats):
            order = ("engine", "actor") if i % 2 == 0 else ("actor", "engine")
            for name in order:
                runs[name].append(systems[name].generate(f"{name}-{i}",
                                                         _prompt(i, prompt_tokens, vocab), params))
        loop_after = actor.loop_timings()
        loop = {k: loop_after[k] - loop_before[k] for k in LOOP_FIELDS}
        other = others.share(also_ours_s=loop["process_cpu_s"])
    finally:
        ray.shutdown()
    return _report(alone.timings, runs, loop, other,
                   {"model": alone.engine.source.name, "dtype": dtype, "core": core,
                    "repeats": repeats, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens})


def _summary(runs: list[Run]) -> dict[str, Any]:
    tpots = [r.tpot for r in runs if r.tpot is not None]
    items = sum(1 for r in runs for _, n in r.arrivals if n)
    return {"requests": len(runs), "output_tokens": sum(r.tokens for r in runs),
            "tpot_p50_s": percentile(tpots, 50), "tpot_p90_s": percentile(tpots, 90),
            "tpot_s": tpots, "tokens_per_item": sum(r.tokens for r in runs) / max(items, 1)}


def _report(alone: LoopTimings, runs: dict[str, list[Run]], loop: dict[str, float],
            other: float | None, setup: dict[str, Any]) -> dict[str, Any]:
    systems = {name: _summary(rs) for name, rs in runs.items()}
    engine_tokens = systems["engine"]["output_tokens"]
    actor_tokens = systems["actor"]["output_tokens"]

    def per_token(seconds: float, tokens: int) -> float:
        return seconds / tokens

    systems["engine"]["per_token_s"] = {"step": per_token(alone.step_s, engine_tokens),
                                        "forward": per_token(alone.forward_s, engine_tokens)}
    actor_runs = runs["actor"]
    inner = [r.final.metrics.tpot(r.tokens) for r in actor_runs]
    systems["actor"]["per_token_s"] = {
        "step": per_token(loop["step_s"], actor_tokens),
        "forward": per_token(loop["forward_s"], actor_tokens),
        "between_steps": per_token(loop["calls_s"] + loop["deliver_s"], actor_tokens),
        "engine_thread_cpu": per_token(loop["cpu_s"], actor_tokens),
        "other_threads_cpu": per_token(loop["process_cpu_s"] - loop["cpu_s"], actor_tokens),
    }
    systems["actor"]["engine_tpot_p50_s"] = percentile([t for t in inner if t is not None], 50)
    systems["actor"]["last_token_delivery_p50_s"] = percentile(
        [r.arrivals[-1][0] - (r.final.metrics.finished or 0.0) for r in actor_runs], 50)
    systems["actor"]["loop_steps_per_token"] = loop["steps"] / actor_tokens
    e, a = systems["engine"]["tpot_p50_s"], systems["actor"]["tpot_p50_s"]
    return {
        "machine": machine_info(1),
        **setup,
        "other_cpu_busy": other,
        "systems": systems,
        "ratios": {"actor_vs_engine_tpot": a / e if a and e else None, "target": TARGET},
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"baton bench actor: {report['model']} {report['dtype']}, batch 1, "
                        f"one thread on core {report['core']}", caption="times in ms per token")
    table.add_column("system", no_wrap=True)
    for col in ("TPOT p50", "TPOT p90", "step", "forward", "between steps", "tokens/item"):
        table.add_column(col, justify="right")
    for name, s in report["systems"].items():
        per = s["per_token_s"]
        table.add_row(name, ms(s["tpot_p50_s"]), ms(s["tpot_p90_s"]), ms(per["step"]),
                      ms(per["forward"]), ms(per.get("between_steps")),
                      f"{s['tokens_per_item']:.2f}")
    console.print(table)
    actor = report["systems"]["actor"]
    per = actor["per_token_s"]
    console.print(f"actor: engine-side TPOT p50 {ms(actor['engine_tpot_p50_s'])} ms, last token "
                  f"delivered {ms(actor['last_token_delivery_p50_s'])} ms after the engine "
                  f"emitted it (p50); CPU per token: engine thread "
                  f"{ms(per['engine_thread_cpu'])} ms, the actor's other threads "
                  f"{ms(per['other_threads_cpu'])} ms")
    warn_if_busy(console, {"the run": report["other_cpu_busy"]},
                 "those figures are skewed; rerun on a quiet machine")
    ratio = report["ratios"]["actor_vs_engine_tpot"]
    console.print("actor_vs_engine_tpot: " + ("-" if ratio is None else f"{ratio:.2f}x")
                  + f" (target at most {TARGET:.2f}x)")


def main(*, json_path: str | None = None, **kw: Any) -> dict[str, Any]:
    """Run the benchmark, write the JSON report to `json_path` (if given), print a table."""
    return run_and_report(lambda progress: run(progress=progress, **kw), print_report, json_path)
