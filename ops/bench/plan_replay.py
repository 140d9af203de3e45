"""The planner against what `baton bench pd` and `baton bench serve` measured on this machine.

Each Baton system of a report is rebuilt as a simulated layout of workers costed by a profile of
this machine's engine (`baton profile`): `bench pd`'s colocated pair (two `both` workers) and its
disaggregated pair (one prefill, one decode worker, its prefill threshold), `bench serve`'s
cluster as `baton up` brings it (the default local config's pools and threshold). Every rate's
recorded requests are replayed (arrival offsets, prompt and output lengths; a block-aligned shared
system prompt counted as cached), and the simulated TTFT/TPOT p50 and attainment under the
report's own SLOs are set beside the measured ones, with each system's goodput over the rates it
ran. `bench serve`'s peer is not Baton and is not simulated.

What serving adds to the engine's own timings is fitted to one report first (`plan_fit`); fit on
one benchmark and replay another to check it.

Requests are replayed as they were served: where the report carries each request's forward
passes and draft tokens (`bench serve`: the router picks acceleration methods), the request
decodes in the simulator with the tokens a step it gained and verified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from baton.cluster.planner.cost import CostModel
from baton.cluster.planner.profile import Profile
from baton.cluster.planner.sim import ClusterSim, ReplicaSpec, SimResult
from baton.engine_config import EngineConfig
from baton.errors import ConfigError
from baton.ops.bench.openloop import goodput
from baton.ops.bench.plan_calibration import profile_cost
from baton.ops.bench.sweep import ATTAINMENT

Layout = tuple[list[ReplicaSpec], int]  # replicas, prefill threshold
P50S = ("ttft_p50", "tpot_p50")  # the latencies compared, each `{name}_s` in a run's record


def _pd_layouts(cost: CostModel, engine: EngineConfig) -> dict[str, Layout]:
    from baton.ops.bench import pd  # its Ray imports only when a pd report is replayed

    def spec(role: str, count: int) -> ReplicaSpec:
        return ReplicaSpec(role, cost, count, engine.max_num_batched_tokens, engine.max_num_seqs)

    return {"colocated": ([spec("both", 2)], pd.PREFILL_THRESHOLD),
            "disaggregated": ([spec("prefill", 1), spec("decode", 1)], pd.PREFILL_THRESHOLD)}


def _serve_layouts(cost: CostModel, engine: EngineConfig) -> dict[str, Layout]:
    from baton.cluster.local import default_local_config

    config = default_local_config()
    specs = [ReplicaSpec(p.role, cost, p.replicas, engine.max_num_batched_tokens,
                         engine.max_num_seqs) for p in config.pools]
    return {"baton": (specs, config.prefill_threshold)}


def layouts(report: dict[str, Any], cost: CostModel) -> dict[str, Layout]:
    """The simulated layout of each Baton system in a `bench pd` or `bench serve` report."""
    ratios = report.get("ratios", {})
    engine = EngineConfig()
    if "goodput_pd_vs_colocated" in ratios:
        return _pd_layouts(cost, engine)
    if "goodput_vs_transformers_serve" in ratios:
        return _serve_layouts(cost, engine)
    raise ConfigError("the report is neither `baton bench pd`'s nor `baton bench serve`'s; "
                      "replay a JSON report one of them wrote with --json")


def p50_or_none(res: SimResult, values: np.ndarray) -> float | None:
    """`res.p50`, None (JSON null) rather than NaN where nothing was served."""
    p = res.p50(values)
    return None if math.isnan(p) else p


def _error(sim: float | None, real: float | None) -> float | None:
    return sim / real - 1 if sim is not None and real else None


def computed_prompts(record: dict[str, Any], cached_tokens: int) -> np.ndarray:
    """Each prompt's tokens left to compute past the shared cached prefix."""
    return np.maximum(np.asarray(record["prompt_tokens"]) - cached_tokens, 1)


def decoding(record: dict[str, Any]) -> list[tuple[float, float] | None] | None:
    """Each request's (tokens gained, tokens verified) per decode step, from the forward passes
    and draft tokens the run recorded (None: the report has none; an entry None: one and one)."""
    passes = record.get("forward_passes")
    if passes is None:
        return None
    out: list[tuple[float, float] | None] = []
    for timing, counted in zip(record["timings"], passes, strict=True):
        # The first pass makes the first token (a prefill, or an import's); the rest decode.
        steps, tokens = (counted[0] - 1, timing[2] - 1) if counted else (0, 0)
        if steps < 1 or tokens <= steps:
            out.append(None)
            continue
        gain = tokens / steps
        out.append((gain, max(gain, 1 + counted[1] / steps)))
    return out


def simulate(layout: Layout, record: dict[str, Any], cached_tokens: int) -> SimResult:
    specs, threshold = layout
    prompts = computed_prompts(record, cached_tokens)
    # Every prompt opens with the same cached blocks, which the router's affinity follows.
    groups = np.zeros(len(prompts), dtype=int) if cached_tokens else None
    # The benchmark's workers shared this machine's cores.
    contention = max(s.cost.eff.host_contention for s in specs)
    sim = ClusterSim(specs, threshold, host_contention=contention)
    return sim.run(np.asarray(record["arrivals"], dtype=float), prompts,
                   np.asarray(record["max_tokens"]), groups, decoding(record))


def replay_run(layout: Layout, record: dict[str, Any], slo: tuple[float, float],
               cached_tokens: int) -> dict[str, Any]:
    """One measured run through the simulator: its p50s and attainment, and their errors."""
    if "arrivals" not in record:
        raise ConfigError("the report's runs carry no arrival offsets (written before they were "
                          "recorded); run the benchmark again to replay it")
    res = simulate(layout, record, cached_tokens)
    sim = {"ttft_p50_s": p50_or_none(res, res.ttft), "tpot_p50_s": p50_or_none(res, res.tpot),
           "attainment": res.attainment(*slo), "remote_prefills": res.remote_prefills}
    real = {k: record[k] for k in ("ttft_p50_s", "tpot_p50_s", "attainment")}
    return {"real": real, "sim": sim,
            "error": {k: _error(sim[f"{k}_s"], real[f"{k}_s"]) for k in P50S},
            "request_error": _request_errors(record, res),
            "busy": _busy(record, res)}


def _request_errors(record: dict[str, Any], res: SimResult) -> dict[str, float | None]:
    """Request by request, the median of |simulated / measured - 1| for TTFT and TPOT (None
    where no request has both). Unlike the p50s' errors, it does not jump where a run's
    latencies fall in two groups with the median between them (`bench pd`'s short prompts and
    those queued behind a long prefill): it says how closely each request is followed."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(("ttft", "tpot")):
        real = np.asarray([t[i] if t[i] is not None else np.nan for t in record["timings"]],
                          dtype=float)
        sim = getattr(res, name)
        ok = np.isfinite(real) & np.isfinite(sim) & (real > 0)
        out[name] = float(np.median(np.abs(sim[ok] / real[ok] - 1))) if ok.any() else None
    return out


def _busy(record: dict[str, Any], res: SimResult) -> dict[str, dict[str, float]]:
    """Per role, the share of the run its engines spent stepping (mean over the role's
    workers): measured (a worker's step time over the run's wall time, where the report kept
    the workers' loads) and simulated. Empty for a report without them."""
    shares: dict[str, list[float]] = {}
    for w in record.get("workers") or []:
        if w["wall_s"] > 0:
            shares.setdefault(w["role"], []).append(w["step_s"] / w["wall_s"])
    return {role: {"real": float(np.mean(v)), "sim": res.busy.get(role, 0.0)}
            for role, v in sorted(shares.items())}


def _steps_apart(rates: Sequence[float], a: float, b: float) -> int:
    """How many of the swept rates lie between goodputs `a` and `b` (0 below every rate)."""
    def index(g: float) -> int:
        return sum(r <= g for r in rates)

    return abs(index(a) - index(b))


def replay(report: dict[str, Any], profile: Profile, cached_tokens: int = 0) -> dict[str, Any]:
    """Every Baton system and rate of `report` replayed on `profile`'s cost model."""
    cost = profile_cost(profile)
    slo = (report["slo"]["ttft_s"], report["slo"]["tpot_s"])
    systems: dict[str, Any] = {}
    # Errors where the real system met its SLOs (past that its queue, and the error, grows).
    worst: dict[str, float] = {"ttft_p50": 0.0, "tpot_p50": 0.0, "ttft_per_request": 0.0,
                               "tpot_per_request": 0.0}
    steps = 0
    for name, layout in layouts(report, cost).items():
        measured = report["systems"][name]
        runs = {float(r): replay_run(layout, rec, slo, cached_tokens)
                for r, rec in measured["rates"].items()}
        real_good = measured["goodput_rps"]
        sim_good = goodput({r: run["sim"] for r, run in runs.items()}, ATTAINMENT)
        apart = _steps_apart(sorted(runs), real_good, sim_good)
        steps = max(steps, apart)
        for rate, run in runs.items():
            if rate > real_good and rate != min(runs):
                continue
            for k, e in run["error"].items():
                if e is not None:
                    worst[k] = max(worst[k], abs(e))
            for k, e in run["request_error"].items():
                if e is not None:
                    worst[f"{k}_per_request"] = max(worst[f"{k}_per_request"], e)
        systems[name] = {"goodput_real_rps": real_good, "goodput_sim_rps": sim_good,
                         "goodput_rate_steps_apart": apart,
                         "rates": {str(r): run for r, run in sorted(runs.items())}}
    return {"model": report.get("model"), "profile_device": profile.device,
            "cached_prefix_tokens": cached_tokens, "systems": systems,
            "worst_abs_error_within_slo": {**worst, "goodput_rate_steps": steps}}


def repeats(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The measured p50s of every system and rate that two of `reports` ran on the same
    requests (the same arrival offsets and lengths: the same benchmark with the same seed) set
    side by side, with the first over the second - 1: how far the real system repeats itself,
    the floor under any simulated error."""
    def runs(report: dict[str, Any]):
        for system, measured in report["systems"].items():
            for rate, record in measured["rates"].items():
                key = (system, rate, tuple(record.get("arrivals", ())),
                       tuple(record["prompt_tokens"]), tuple(record["max_tokens"]))
                yield key, record

    out = []
    names = list(reports)
    for i, a in enumerate(names):
        first = dict(runs(reports[a]))
        for b in names[i + 1:]:
            for key, second in runs(reports[b]):
                if key not in first or not key[2]:
                    continue
                one = first[key]
                out.append({"system": key[0], "rate": key[1], "reports": [a, b],
                            **{k: [one[f"{k}_s"], second[f"{k}_s"]] for k in P50S},
                            "difference": {k: _error(one[f"{k}_s"], second[f"{k}_s"])
                                           for k in P50S}})
    return out


def cached_prefix_tokens(model: str, block_size: int | None = None) -> int:
    """The prompt tokens every request of the benchmarks' chat workload shares (the chat
    template and system prompt), in whole KV blocks: what the prefix cache spares each prefill."""
    from baton.actors.model_source import load_tokenizer, resolve
    from baton.ops.bench.sweep import probes

    block = block_size or EngineConfig().block_size
    a, b = (p.prompt_ids for p in probes(load_tokenizer(resolve(model)), "Prefix", 2, 0, 1, 0))
    shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                  min(len(a), len(b)))
    return shared // block * block
