"""Replaying a measured `bench pd` report, and the serving scale fitted to one."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from baton.cluster.planner.profile import Profile
from baton.errors import ConfigError
from baton.ops.bench import plan_replay
from baton.ops.bench.plan_calibration import profile_cost

DATA = Path(__file__).parent / "data"
PROFILE = Profile.load(DATA / "cpu_smollm2_1thread.json")
REPORT = json.loads((DATA / "bench_pd_cpu_smollm2.json").read_text())
CACHED = REPORT["cached_prefix_tokens"]


def test_a_serving_scale_slows_every_step_by_that_factor() -> None:
    bare, served = profile_cost(PROFILE), profile_cost(dataclasses.replace(PROFILE,
                                                                           serving_scale=1.25))
    for args in ((512, 512 * 256, 0, 0.0), (0, 0.0, 8, 8 * 900.0), (100, 5000.0, 4, 2000.0)):
        assert served.iteration(*args) == pytest.approx(1.25 * bare.iteration(*args), rel=1e-9)


def test_the_fitted_scale_and_handoff_match_the_lowest_rate() -> None:
    """Fitted on a report, the lowest rate's simulated TPOT p50s meet the measured ones in their
    geometric mean, and remote prefills' TTFTs the measured ones in their median; a profile
    fitted already fits to the same values."""
    scale, handoff = plan_replay.fit_serving(REPORT, PROFILE, CACHED)
    assert scale > 1 and handoff > 0  # a serving worker is slower than its engine alone
    fitted = dataclasses.replace(PROFILE, serving_scale=scale, handoff_s=handoff)
    replayed = plan_replay.replay(REPORT, fitted, CACHED)
    ratios = []
    for system in replayed["systems"].values():
        lowest = min(system["rates"], key=float)
        run = system["rates"][lowest]
        ratios.append(run["sim"]["tpot_p50_s"] / run["real"]["tpot_p50_s"])
    assert math.prod(ratios) ** (1 / len(ratios)) == pytest.approx(1.0, rel=0.01)
    assert plan_replay.fit_serving(REPORT, fitted, CACHED) == pytest.approx((scale, handoff))
    record = REPORT["systems"]["disaggregated"]["rates"]["0.25"]
    layout = plan_replay.layouts(REPORT, profile_cost(fitted))["disaggregated"]
    res = plan_replay._simulate(layout, record, CACHED)
    remote = np.asarray(record["prompt_tokens"]) - CACHED >= layout[1]
    gaps = np.asarray([t[0] for t in record["timings"]])[remote] - res.ttft[remote]
    assert abs(float(np.median(gaps))) < 0.01


def test_a_report_of_another_benchmark_is_refused() -> None:
    with pytest.raises(ConfigError, match="bench pd.*bench serve"):
        plan_replay.replay({"slo": REPORT["slo"], "ratios": {}}, PROFILE)


def test_a_report_without_arrivals_says_to_run_it_again() -> None:
    old = json.loads(json.dumps(REPORT))
    for system in old["systems"].values():
        for run in system["rates"].values():
            del run["arrivals"]
    with pytest.raises(ConfigError, match="run the benchmark again"):
        plan_replay.replay(old, PROFILE)
