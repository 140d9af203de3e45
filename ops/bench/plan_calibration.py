"""The planner against a real engine on this machine: the same open-loop requests run for real
(one engine, continuous batching, wall-clock Poisson arrivals) and through the simulator fed the
engine's measured profile; TTFT/TPOT p50 and goodput compared.

This is the in-process (one worker, no Ray, no router) version of the comparison with
`baton bench pd` / `baton bench serve` (not yet run: that needs a quiet machine for minutes).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from baton.actors.engine import Engine
from baton.cluster.planner.cost import CostModel, device_from_profile
from baton.cluster.planner.model import profile_from_config
from baton.cluster.planner.plan import CPU_PRICE_PER_CORE_HOUR
from baton.cluster.planner.profile import Profile
from baton.cluster.planner.sim import ClusterSim, ReplicaSpec, SimResult
from baton.ops.bench.openloop import poisson_arrivals
from baton.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class Timings:
    ttft: np.ndarray
    tpot: np.ndarray

    def p50(self) -> tuple[float, float]:
        return float(np.nanmedian(self.ttft)), float(np.nanmedian(self.tpot))


def profile_cost(profile: Profile,
                 price_per_core_hour: float = CPU_PRICE_PER_CORE_HOUR) -> CostModel:
    """The cost model of one worker of the machine a CPU profile was measured on."""
    model = profile_from_config(profile.model_config, profile.model, profile.dtype)
    device, eff = device_from_profile(profile, model, price_per_core_hour * profile.threads)
    return CostModel(device, model, 1, eff, kv_memory=profile.kv_cache_memory)


def real_run(engine: Engine, arrivals: Sequence[float], prompts: Sequence[list[int]],
             outputs: Sequence[int]) -> Timings:
    """Run the requests through `engine` as they arrive (open loop); their TTFT and TPOT."""
    n = len(arrivals)
    first = np.full(n, np.nan)
    last = np.full(n, np.nan)
    t0 = time.perf_counter()
    i = 0
    while i < n or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < n and arrivals[i] <= now:
            engine.add_request(prompts[i], SamplingParams(max_tokens=outputs[i], ignore_eos=True),
                               request_id=str(i))
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[i] - now))  # open loop: idle until the next arrival
            continue
        outs = engine.step()
        t = time.perf_counter() - t0
        for out in outs:
            k = int(out.request_id)
            if out.token_ids and np.isnan(first[k]):
                first[k] = t
            if out.finished:
                last[k] = t
    arr = np.asarray(arrivals)
    out_n = np.asarray(outputs, dtype=float)
    tpot = np.where(out_n >= 2, (last - first) / np.maximum(out_n - 1, 1), np.nan)
    return Timings(first - arr, tpot)


def simulate(profile: Profile, arrivals: Sequence[float], prompt_lens: Sequence[int],
             outputs: Sequence[int], max_num_batched_tokens: int,
             max_num_seqs: int) -> SimResult:
    spec = ReplicaSpec("both", profile_cost(profile), 1, max_num_batched_tokens, max_num_seqs)
    return ClusterSim([spec], 0).run(np.asarray(arrivals, dtype=float),
                                     np.asarray(prompt_lens), np.asarray(outputs))


def requests(vocab: int, n: int, prompt: tuple[int, int], output: tuple[int, int],
             seed: int) -> tuple[list[list[int]], list[int]]:
    """`n` random-token prompts (no shared prefix) and output lengths, uniform in the ranges."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))] for _ in range(n)]
    return prompts, [rng.randint(*output) for _ in range(n)]


def compare(engine: Engine, profile: Profile, rate: float, n: int, prompt: tuple[int, int],
            output: tuple[int, int], seed: int = 0) -> dict[str, Any]:
    """One rate: the real engine's and the simulator's p50s, and the simulator's errors."""
    prompts, outs = requests(engine.vocab_size, n, prompt, output, seed)
    arrivals = poisson_arrivals(n, rate, seed)
    real = real_run(engine, arrivals, prompts, outs)
    cfg = engine.config
    sim = simulate(profile, arrivals, [len(p) for p in prompts], outs,
                   cfg.max_num_batched_tokens, cfg.max_num_seqs)
    (rt, rp), (st, sp) = real.p50(), (sim.p50(sim.ttft), sim.p50(sim.tpot))
    return {"rate": rate, "requests": n, "real": {"ttft_p50_s": rt, "tpot_p50_s": rp},
            "sim": {"ttft_p50_s": st, "tpot_p50_s": sp},
            "error": {"ttft_p50": st / rt - 1, "tpot_p50": sp / rp - 1}}


def sweep(engine: Engine, profile: Profile, rates: Sequence[float], n: int,
          prompt: tuple[int, int], output: tuple[int, int], slo_scale: tuple[float, float],
          seed: int = 0) -> dict[str, Any]:
    """Rising rates, real and simulated, under SLOs set as `baton bench` sets them (multiples of
    the longest prompt's TTFT and of TPOT alone, measured on the real engine); per rate the p50
    errors and attainments, and the goodput (highest rate, all lower ones passing) of each."""
    cfg = engine.config
    prompts, outs = requests(engine.vocab_size, 1, (prompt[1], prompt[1]), (32, 32), seed + 99)
    alone = real_run(engine, [0.0], prompts, outs)
    slo_ttft, slo_tpot = slo_scale[0] * alone.p50()[0], slo_scale[1] * alone.p50()[1]
    runs = []
    for k, rate in enumerate(sorted(rates)):
        prompts, outs = requests(engine.vocab_size, n, prompt, output, seed + 1000 * (k + 1))
        arrivals = poisson_arrivals(n, rate, seed + k)
        real = real_run(engine, arrivals, prompts, outs)
        sim = simulate(profile, arrivals, [len(p) for p in prompts], outs,
                       cfg.max_num_batched_tokens, cfg.max_num_seqs)
        met = (real.ttft <= slo_ttft) & ((real.tpot <= slo_tpot) | np.isnan(real.tpot))
        (rt, rp), (st, sp) = real.p50(), (sim.p50(sim.ttft), sim.p50(sim.tpot))
        runs.append({"rate": rate, "real": {"ttft_p50_s": rt, "tpot_p50_s": rp,
                                            "attainment": float(np.mean(met))},
                     "sim": {"ttft_p50_s": st, "tpot_p50_s": sp,
                             "attainment": sim.attainment(slo_ttft, slo_tpot)},
                     "error": {"ttft_p50": st / rt - 1, "tpot_p50": sp / rp - 1}})

    def goodput(side: str) -> float:
        best = 0.0
        for r in runs:
            if r[side]["attainment"] < 0.9:
                break
            best = r["rate"]
        return best

    ordered = [r["rate"] for r in runs]
    steps = abs(ordered.index(goodput("real")) - ordered.index(goodput("sim"))) \
        if goodput("real") and goodput("sim") else None
    return {"slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot, "scales": slo_scale},
            "runs": runs, "goodput_real_rps": goodput("real"), "goodput_sim_rps": goodput("sim"),
            "goodput_rate_steps_apart": steps}
