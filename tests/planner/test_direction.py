"""The planner agrees with what was measured: mixed GPU pools pay on GPUs (Splitwise), and on this
CPU it ranks colocation and disaggregation as `baton bench pd` measured them beside the profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from baton.cluster.planner.candidates import cpu_layouts, gpu_layouts
from baton.cluster.planner.catalog import Catalog
from baton.cluster.planner.model import load_model
from baton.cluster.planner.profile import Profile
from baton.cluster.planner.search import SLO, Bench, search
from baton.cluster.planner.workload import get_workload
from baton.ops.bench import plan_replay
from baton.ops.bench.plan_calibration import profile_cost

DATA = Path(__file__).parent / "data"
CPU_PROFILE = DATA / "cpu_smollm2_1thread.json"
CPU_BENCH_PD = DATA / "bench_pd_cpu_smollm2.json"  # measured right after the profile


def test_h100_prefill_with_a100_decode_beats_colocated_h100_per_dollar() -> None:
    model, catalog = load_model("llama-3-70b"), Catalog()
    bench = Bench(get_workload("coding"), SLO(ttft_s=1.0, tpot_s=0.03), 600, seed=0)
    colocated = search(gpu_layouts(model, catalog, ["H100"], disaggregated=False), bench)
    mixed = search(gpu_layouts(model, catalog, ["H100"], ["A100-80G"], colocated=False), bench)
    assert mixed[0].per_dollar >= 1.3 * colocated[0].per_dollar, (mixed[0], colocated[0])


def _measured() -> dict:
    return json.loads(CPU_BENCH_PD.read_text())


def test_replayed_bench_pd_ranks_the_systems_as_measured() -> None:
    """The very requests `bench pd` sent, through both simulated layouts: the simulated goodputs
    order the systems as the measured ones do, each within one rate step of its own."""
    report = _measured()
    replayed = plan_replay.replay(report, Profile.load(CPU_PROFILE),
                                  report["cached_prefix_tokens"])
    real = {n: s["goodput_rps"] for n, s in report["systems"].items()}
    sim = {n: s["goodput_sim_rps"] for n, s in replayed["systems"].items()}
    assert real["disaggregated"] > real["colocated"]  # what this machine measured
    assert sim["disaggregated"] > sim["colocated"], sim
    assert replayed["worst_abs_error_within_slo"]["goodput_rate_steps"] <= 1, replayed


def test_planning_the_cpu_machine_picks_what_bench_pd_measured_best() -> None:
    """`baton plan --profile` on the bench-pd load with bench pd's SLOs, two cores: the best
    disaggregated layout beats the best colocated one, as measured."""
    cost = profile_cost(Profile.load(CPU_PROFILE))
    slo = _measured()["slo"]
    ranked = search(cpu_layouts(cost, 2, 1, 512, 64, [256]),
                    Bench(get_workload("bench-pd"), SLO(slo["ttft_s"], slo["tpot_s"]), 96,
                          seed=0))
    best = {kind: max(e.goodput_rps for e in ranked if e.layout.kind == kind)
            for kind in ("colocated", "disaggregated")}
    assert best["disaggregated"] > best["colocated"], best
    assert ranked[0].layout.kind == "disaggregated"
    assert np.isfinite([e.ttft_p50_s for e in ranked]).all()
