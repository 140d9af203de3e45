"""`baton bench plan`'s report: both runs happened and its ratios are the quotients they claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baton.cluster.planner.profile import Profile
from baton.errors import ConfigError
from baton.ops.bench import plan


def test_bench_plan_reports_speed_and_the_per_iteration_baseline() -> None:
    report = plan.run(hours=0.001, rate=200.0, baseline_s=0.5, calibrate=False)
    assert report["cluster"]["gpus"] == 1000
    full, window = report["full"], report["window"]
    assert full["requests"] == 720
    assert window["per_iteration"]["events"] > window["skipping"]["events"]
    ratios = report["ratios"]
    assert ratios["simulated_seconds_per_wall_second"] == pytest.approx(
        full["simulated_s"] / full["wall_s"])
    assert ratios["skipping_speedup_vs_per_iteration"] == pytest.approx(
        window["per_iteration"]["wall_s"] / window["skipping"]["wall_s"])
    assert report["calibration"] is None


def test_bench_plan_fits_the_serving_scale_on_one_report_and_replays(tmp_path) -> None:
    data = Path(__file__).parents[1] / "planner" / "data"
    report_path, saved = str(data / "bench_pd_cpu_smollm2.json"), tmp_path / "served.json"
    report = plan.run(hours=0.0005, rate=100.0, baseline_s=0.1, calibrate=False,
                      replay=[report_path], profile=str(data / "cpu_smollm2_1thread.json"),
                      fit_on=[report_path], save_profile=str(saved))
    fitted, served = report["serving_fit"], Profile.load(saved)
    assert (served.serving_scale, served.prefill_scale, served.handoff_s, served.request_s,
            served.handoff_busy_s) == pytest.approx(
        (fitted["scale"], fitted["prefill_scale"], fitted["handoff_s"], fitted["request_s"],
         fitted["handoff_busy_s"]))
    assert list(report["replays"]) == [report_path]
    replayed = report["replays"][report_path]
    assert set(replayed["systems"]) == {"colocated", "disaggregated"}
    assert report["ratios"]["replay_goodput_worst_rate_steps"] == (
        replayed["worst_abs_error_within_slo"]["goodput_rate_steps"])
    # One report: nothing was measured twice.
    assert report["repeats"] == [] and not any(k.startswith("repeat_") for k in report["ratios"])


def test_bench_plan_sets_runs_of_the_same_requests_side_by_side(tmp_path) -> None:
    data = Path(__file__).parents[1] / "planner" / "data"
    first = data / "bench_pd_cpu_smollm2.json"
    second = json.loads(first.read_text())
    second["systems"]["colocated"]["rates"]["0.25"]["tpot_p50_s"] *= 1.25
    (tmp_path / "again.json").write_text(json.dumps(second))
    report = plan.run(hours=0.0005, rate=100.0, baseline_s=0.1, calibrate=False,
                      replay=[str(first), str(tmp_path / "again.json")],
                      profile=str(data / "cpu_smollm2_1thread.json"))
    assert len(report["repeats"]) == sum(len(s["rates"]) for s in second["systems"].values())
    assert report["ratios"]["repeat_tpot_p50_worst_abs_difference"] == pytest.approx(0.2)
    assert report["ratios"]["repeat_ttft_p50_worst_abs_difference"] == 0.0


def test_replaying_without_a_profile_says_what_to_add() -> None:
    with pytest.raises(ConfigError, match="--profile"):
        plan.run(hours=0.0005, rate=100.0, calibrate=False, replay=["pd.json"])
