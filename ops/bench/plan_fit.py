"""What serving adds to a profile's engine-alone timings, fitted to `bench pd` and/or `bench serve`
reports of this machine (`baton bench plan --fit-on`, repeatable), for `plan_replay` to replay
with. Given several reports, every figure is fitted on all their runs at once.

A profile times the engine alone; a serving worker's steps take longer (its actor, Ray, the router
and the KV link share the machine), a prefill worker's longer again (its KV sender shares its
core), every request pays for the serving path (API, router, actor calls), and a remote
prefill's handoff costs calls beyond moving its bytes. `fit_serving` measures them at each
system's lowest rate, where a request waits for little but its own steps: the step factor
as measured over simulated TPOT p50, per system (geometric mean); the prompt factor of the
iterations that carry prompts where they decode, with the request's path (least squares in
relative error over those prompts' TTFTs; the path, for each factor tried, the median gap), and
the step factor again under it (those iterations carry decode steps too); then the prefill
factor and handoff that bring the remote prefills' simulated TTFTs nearest the
measured ones (least squares in relative error; the handoff, for each factor tried, the median
gap). Then, over every rate within the SLOs, the host contention (`ClusterSim`): the workers
share this machine, and a served decode step slows as load grows, beyond what its batch explains
(`bench serve` here: TPOT p50 33.7 ms at 4 req/s against 25.3 simulated without it). An engine
alone does not slow while another process prefills on the other core (decode steps of 24.0 ms
against 24.4 ms alone, measured here); what comes with a prompt does: its KV arriving layer by
layer during the prefill, received on the decode worker's own core, and the router's and the
client's work. The fit lumps these as a slowdown of the decode runs a prompt iteration
overlaps, bounded at half speed (a core time-shared with one other busy process). Last, the
extra handoff for a busy decode worker, per sequence it holds, at the highest rate within the
SLOs: a handoff into a worker decoding six streams took about 135 ms longer than into an idle
one, measured here, and a constant fitted at the highest rate overshot the lower ones (a `bench
serve` TTFT p50 at 1.0 req/s 0.39 s simulated against 0.23-0.27 s measured). Fit on one set of
reports and replay another set of the same machine to check them.

One report may not tell two figures apart: `bench pd`'s remote prompts are all long (its
threshold is 256 tokens), and on those a slower prefill worker and a longer handoff look alike,
while `bench serve`'s remote prompts are short and its local ones too, so it barely tells a prompt
factor from the request's path. Fitted on both, each figure sees both kinds of prompt; measured
here, that predicted the TTFT p50s no better than `bench pd` alone (see the README).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from baton.cluster.planner.cost import CostModel
from baton.cluster.planner.profile import Profile
from baton.errors import ConfigError
from baton.ops.bench.plan_calibration import profile_cost
from baton.ops.bench.plan_replay import computed_prompts, layouts, p50_or_none, simulate
from baton.ops.bench.sweep import ATTAINMENT


@dataclasses.dataclass(frozen=True, slots=True)
class ServingFit:
    """What serving adds to a profile's engine-alone timings (see the module's doc)."""

    scale: float  # every step
    prefill_scale: float  # a prefill worker's steps, on top of `scale`
    handoff_s: float  # each remote prefill's TTFT
    request_s: float = 0.0  # every request's TTFT
    handoff_busy_s: float = 0.0  # a remote TTFT, per sequence its stepping decoder holds
    host_contention: float = 0.0  # the workers' iterations, while another's runs a prompt
    prompt_scale: float = 1.0  # other workers' iterations with prompt tokens, on top of `scale`

    def apply(self, profile: Profile) -> Profile:
        return dataclasses.replace(profile, serving_scale=self.scale,
                                   prefill_scale=self.prefill_scale, handoff_s=self.handoff_s,
                                   request_s=self.request_s, handoff_busy_s=self.handoff_busy_s,
                                   host_contention=self.host_contention,
                                   prompt_scale=self.prompt_scale)


# Prefill factors tried: a prefill worker measured 1.0-1.5x a decode worker's step factor here.
PREFILL_SCALES = np.round(np.arange(1.0, 2.001, 0.02), 2)
# Prompt factors tried for the prompts prefilled where they decode (1.2-1.4 fitted here).
PROMPT_SCALES = np.round(np.arange(0.5, 2.001, 0.02), 2)


Reports = Sequence[dict[str, Any]]  # fitted together: every figure on all their runs


def _systems(reports: Reports, cost: CostModel):
    """(layout, runs by rate) of every Baton system in `reports`."""
    for report in reports:
        for name, layout in layouts(report, cost).items():
            yield layout, report["systems"][name]["rates"]


def _lowest_runs(reports: Reports, cost: CostModel):
    for layout, rates in _systems(reports, cost):
        yield layout, rates[min(rates, key=float)]


def _loaded_runs(reports: Reports, cost: CostModel):
    """Per system, its run at the highest rate above its lowest that still met the SLOs."""
    for layout, rates in _systems(reports, cost):
        met = [r for r in rates if rates[r]["attainment"] >= ATTAINMENT]
        if met and max(met, key=float) != min(rates, key=float):
            yield layout, rates[max(met, key=float)]


def _ttfts(reports: Reports, profile: Profile, cached_tokens: int,
           remote: bool, runs=_lowest_runs) -> tuple[np.ndarray, np.ndarray]:
    """(measured, simulated) TTFTs on `profile`, in the lowest rates' runs (or other `runs`), of
    the remote prefills (`remote`) or of the prompts prefilled where they decode (every prompt,
    without a prefill worker); only pairs with a simulated TTFT and a positive measured one."""
    real: list[np.ndarray] = []
    sim: list[np.ndarray] = []
    for layout, record in runs(reports, profile_cost(profile)):
        specs, threshold = layout
        split = any(s.role == "prefill" for s in specs)
        if remote and not split:
            continue
        res = simulate(layout, record, cached_tokens)
        away = (computed_prompts(record, cached_tokens) >= threshold) & split
        pick = away if remote else ~away
        real.append(np.asarray([t[0] for t in record["timings"]], dtype=float)[pick])
        sim.append(res.ttft[pick])
    if not real:
        return np.empty(0), np.empty(0)
    r, s = np.concatenate(real), np.concatenate(sim)
    keep = np.isfinite(s) & (r > 0)
    return r[keep], s[keep]


def _step_scale(reports: Reports, profile: Profile, cached_tokens: int,
                fit: ServingFit) -> float:
    """The step factor that brings `fit`'s simulated TPOT p50s at the lowest rates to the
    measured ones in their geometric mean (the factor `fit` has is replaced)."""
    trial = dataclasses.replace(fit, scale=1.0).apply(profile)
    logs = []
    for layout, record in _lowest_runs(reports, profile_cost(trial)):
        res = simulate(layout, record, cached_tokens)
        real, sim = record["tpot_p50_s"], p50_or_none(res, res.tpot)
        if real and sim:
            logs.append(math.log(real / sim))
    if not logs:
        raise ConfigError("the report has no run with a TPOT to fit the serving scale to")
    return math.exp(sum(logs) / len(logs))


def fit_serving(reports: Reports, profile: Profile, cached_tokens: int = 0) -> ServingFit:
    """The step factor, prompt factor, request path, prefill factor and handoff that the lowest
    rates of `reports` measured, the host contention and busy handoff their loaded rates did (see
    the module's doc); the profile's own values are ignored."""
    if not reports:
        raise ConfigError("fitting the serving scale needs at least one bench report")
    scale = _step_scale(reports, profile, cached_tokens, ServingFit(1.0, 1.0, 0.0))
    local = _fit_local_prompts(reports, profile, cached_tokens, ServingFit(scale, 1.0, 0.0))
    # Prompt iterations carry decode steps too: the step factor again, under the prompt factor.
    scale = _step_scale(reports, profile, cached_tokens, local)
    local = _fit_local_prompts(reports, profile, cached_tokens,
                               dataclasses.replace(local, scale=scale))
    trials = (dataclasses.replace(local, prefill_scale=float(s)) for s in PREFILL_SCALES)
    best = _fit_with_gap(reports, profile, cached_tokens, trials, remote=True) or local
    # The contention first: it lengthens the decode runs that a busy handoff waits on.
    return _fit_busy_handoff(reports, profile, cached_tokens,
                             _fit_contention(reports, profile, cached_tokens, best))


def _fit_local_prompts(reports: Reports, profile: Profile, cached_tokens: int,
                       fit: ServingFit) -> ServingFit:
    """`fit` with the prompt factor and request path that bring the lowest rates' simulated
    TTFTs of the prompts prefilled where they decode nearest the measured ones (`_fit_with_gap`).
    A constant alone cannot follow them: measured here, 40-token prompts took less than the
    median gap and 700-1,000-token ones 20-30% more than simulated."""
    trials = (dataclasses.replace(fit, prompt_scale=float(s)) for s in PROMPT_SCALES)
    return _fit_with_gap(reports, profile, cached_tokens, trials, remote=False) or fit


def _fit_with_gap(reports: Reports, profile: Profile, cached_tokens: int,
                  trials: Iterable[ServingFit], remote: bool) -> ServingFit | None:
    """Of `trials`, the one whose lowest-rate simulated TTFTs of the remote prefills (`remote`:
    plus the handoff) or of the local prompts (plus the request path) come nearest the measured
    ones, least squares in relative error, with that constant set to the median gap left by the
    trial without it; None where the report has no such prompt."""
    gap = "handoff_s" if remote else "request_s"
    best, best_err = None, math.inf
    for trial in trials:
        trial = dataclasses.replace(trial, **{gap: 0.0})
        real, sim = _ttfts(reports, trial.apply(profile), cached_tokens, remote=remote)
        if not len(real):
            return None
        constant = max(0.0, float(np.median(real - sim)))
        err = float(np.sum(((sim + constant) / real - 1) ** 2))
        if err < best_err - 1e-12:
            best, best_err = dataclasses.replace(trial, **{gap: constant}), err
    return best


# Extra handoff times tried for a decode worker that is stepping, per sequence it holds (0 to
# 0.2 s; 33-140 ms fitted here).
HANDOFF_BUSY = np.round(np.arange(0.0, 0.2001, 0.0025), 4)


def _fit_busy_handoff(reports: Reports, profile: Profile, cached_tokens: int,
                      fit: ServingFit) -> ServingFit:
    """`fit` with the extra handoff time per running sequence that brings the remote prefills'
    simulated TTFTs nearest the measured ones (least squares in relative error) at each system's
    highest rate within the SLOs, where the decode worker is busy; unchanged without such a
    run."""
    best, best_err = fit, math.inf
    for extra in HANDOFF_BUSY:
        trial = dataclasses.replace(fit, handoff_busy_s=float(extra))
        real, sim = _ttfts(reports, trial.apply(profile), cached_tokens, remote=True,
                           runs=_loaded_runs)
        if not len(real):
            return fit
        err = float(np.sum((sim / real - 1) ** 2))
        if err < best_err - 1e-12:
            best, best_err = trial, err
    return best


# Host contentions tried: 0 to 1 (a decode run at half speed while a prompt runs elsewhere, as on
# a core time-shared with one other busy process; unbounded, a fit on one noisy report wanders
# to wherever its grid ends).
HOST_CONTENTION = np.round(np.arange(0.0, 1.0001, 0.05), 2)


def _within_slo_runs(reports: Reports, cost: CostModel):
    """Per system, its runs at the rates that met the SLOs (the lowest always)."""
    for layout, rates in _systems(reports, cost):
        low = min(rates, key=float)
        for rate, record in rates.items():
            if rate == low or record["attainment"] >= ATTAINMENT:
                yield layout, record


def _fit_contention(reports: Reports, profile: Profile, cached_tokens: int,
                    fit: ServingFit) -> ServingFit:
    """`fit` with the host contention whose simulated TPOT p50s come nearest the measured ones
    (least squares in log ratio) over every rate within the SLOs, each with the step factor
    fitted again at the lowest rates under it: the factor takes what every step pays, the
    contention the slowdown that grows with load. Unchanged where no run has a TPOT."""
    best, best_err = fit, math.inf
    for share in HOST_CONTENTION:
        trial = dataclasses.replace(fit, host_contention=float(share))
        if share:
            trial = dataclasses.replace(trial, scale=_step_scale(reports, profile, cached_tokens,
                                                                 trial))
        logs = []
        for layout, record in _within_slo_runs(reports, profile_cost(trial.apply(profile))):
            res = simulate(layout, record, cached_tokens)
            real, sim = record["tpot_p50_s"], p50_or_none(res, res.tpot)
            if real and sim:
                logs.append(math.log(sim / real))
        if not logs:
            return fit
        err = float(np.sum(np.square(logs)))
        if err < best_err - 1e-12:
            best, best_err = trial, err
    return best
