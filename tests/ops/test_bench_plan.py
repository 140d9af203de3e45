"""`baton bench plan`'s report: both runs happened and its ratios are the quotients they claim."""

from __future__ import annotations

import pytest

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
