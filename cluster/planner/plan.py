"""`baton plan` as a library call: from a question (model, workload, SLOs, budget) to a layout."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from baton.cluster.planner.candidates import THRESHOLDS, cpu_layouts, gpu_layouts
from baton.cluster.planner.catalog import Catalog
from baton.cluster.planner.cost import CostModel, Efficiency, calibrate, device_from_profile
from baton.cluster.planner.layout import Layout
from baton.cluster.planner.model import ModelProfile, load_model, profile_from_config
from baton.cluster.planner.profile import Profile
from baton.cluster.planner.search import SLO, Bench, Evaluated, cheapest_for_rate, search
from baton.cluster.planner.sim import Speculation
from baton.cluster.planner.workload import Lengths, Trace, get_workload, load_trace
from baton.errors import ConfigError

CPU_PRICE_PER_CORE_HOUR = 0.04  # a cloud vCPU-hour, order of magnitude; override per machine


@dataclass(slots=True)
class PlanRequest:
    """What the user asks: model, traffic, SLOs, and the hardware and money allowed."""

    model: str = "default"
    workload: str = "conversation"
    trace: str | None = None
    slo: SLO = field(default_factory=lambda: SLO(1.0, 0.05))
    budget: float | None = None  # $/h
    rate: float | None = None  # requests/s to serve (cheapest layout for it)
    gpus: Sequence[str] = ("H100", "H200", "A100-80G", "A100-40G", "L40S", "L4", "A10G")
    decode_gpus: Sequence[str] | None = None
    catalog: str | None = None
    profile: str | None = None  # a measured profile: a CPU machine, or a GPU's calibration
    cores: int = 2  # a CPU machine's cores
    cpu_price: float = CPU_PRICE_PER_CORE_HOUR
    link_efficiency: float | None = None  # KV link share of the NIC (`baton bench kv`)
    thresholds: Sequence[int] = THRESHOLDS
    speculation: Speculation | None = None  # an acceleration method's measured figures
    num_requests: int = 400
    seed: int = 0
    dtype: str = "bfloat16"


@dataclass(slots=True)
class PlanResult:
    model: ModelProfile
    ranked: list[Evaluated]  # every layout considered, best goodput per dollar first
    winner: Layout
    winner_goodput_rps: float
    target_rate: float | None
    serve_model: str
    # The winner simulated at `winner_goodput_rps` met the SLOs (a layout scaled to the budget
    # is checked this way; a ranked layout's goodput is its own simulation).
    winner_verified: bool = True


class TraceMix:
    """A replayed trace's lengths, resampled (its arrivals set the target rate)."""

    def __init__(self, trace: Trace, name: str):
        self.trace = trace
        self.name = name

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.trace.prompts), n)
        return self.trace.prompts[idx], self.trace.outputs[idx]


def layouts_for(req: PlanRequest) -> tuple[ModelProfile, list[Layout]]:
    """The model's profile and every layout the request allows."""
    if req.profile is not None:
        prof = Profile.load(req.profile)
        if prof.is_cpu:
            model = profile_from_config(prof.model_config, prof.model, prof.dtype)
            device, eff = device_from_profile(prof, model, req.cpu_price * prof.threads)
            cost = CostModel(device, model, 1, eff, kv_memory=prof.kv_cache_memory)
            return model, list(cpu_layouts(cost, req.cores, prof.threads,
                                           prof.max_num_batched_tokens, 64, req.thresholds))
    catalog = Catalog.load(req.catalog)
    model = load_model(req.model, req.dtype)
    efficiency: dict[str, Efficiency] = {}
    if req.profile is not None:
        device = catalog.get(prof.device)
        measured = profile_from_config(prof.model_config, prof.model, prof.dtype)
        efficiency[device.name] = calibrate(device, measured, prof, req.link_efficiency)
    elif req.link_efficiency is not None:
        efficiency = {g: Efficiency(link=req.link_efficiency) for g in catalog.names()}
    for g in [*req.gpus, *(req.decode_gpus or ())]:
        catalog.get(g)  # unknown names fail here, before any simulation
    return model, list(gpu_layouts(model, catalog, req.gpus, req.decode_gpus, req.thresholds,
                                   efficiency=efficiency))


def plan(req: PlanRequest, progress: Callable[[Evaluated], None] | None = None) -> PlanResult:
    """Rank the allowed layouts by goodput per dollar; the winner is the best one (scaled to the
    budget when one is given), or the cheapest that serves `rate` when a rate is asked for."""
    if req.slo.ttft_s <= 0 or req.slo.tpot_s <= 0:
        raise ConfigError("SLOs must be positive (e.g. --slo-ttft 1s --slo-tpot 50ms)")
    model, layouts = layouts_for(req)
    workload: Lengths
    target = req.rate
    if req.trace is not None:
        trace = load_trace(req.trace)
        workload = TraceMix(trace, req.trace)
        target = target if target is not None else trace.rate
    else:
        workload = get_workload(req.workload)
    bench = Bench(workload, req.slo, req.num_requests, req.seed, req.speculation)
    ranked = search(layouts, bench, req.budget, progress)
    best = ranked[0]
    winner, goodput = best.layout, best.goodput_rps
    if target is not None:
        winner, _ = cheapest_for_rate(ranked, bench, target)
        goodput = target
        if req.budget is not None and winner.price_per_hour > req.budget:
            raise ConfigError(f"serving {target:g} requests/s needs ${winner.price_per_hour:.2f}"
                              f"/h, over the budget of ${req.budget:.2f}/h; raise --budget or "
                              "lower --rate")
    verified = True
    if target is None and req.budget is not None:
        k = max(1, math.floor(req.budget / best.price_per_hour))
        if k > 1:
            winner, goodput = best.layout.scaled(k), best.goodput_rps * k
            verified, _ = bench.meets(winner, goodput)
    serve = model.serve_name if req.profile is None else req.model
    return PlanResult(model, ranked, winner, goodput, target, serve, verified)
