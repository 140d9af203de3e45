"""`baton bench pd` end to end on the tiny model, and the open-loop arithmetic it rests on."""

from __future__ import annotations

import json
import statistics

import pytest

from baton.ops.bench import pd, plan_replay
from baton.ops.bench.openloop import SLO, goodput, poisson_arrivals, summarize
from baton.ops.bench.sweep import ATTAINMENT
from baton.ops.bench.workload import RequestTiming
from baton.ops.profile_run import measure

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)


def test_poisson_arrivals_keep_the_rate_and_the_seed():
    a = poisson_arrivals(4000, 2.0, seed=1)
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    assert a[0] == 0.0 and all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.1)  # exponential: sd = mean
    assert poisson_arrivals(10, 2.0, seed=1) == a[:10]


def test_attainment_needs_both_slos_and_goodput_stops_at_the_first_miss():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    timings = [RequestTiming(0.5, 0.05, 10), RequestTiming(2.0, 0.05, 10),
               RequestTiming(0.5, 0.2, 10), RequestTiming(0.9, None, 1)]
    s = summarize(timings, wall_s=2.0, slo=slo)
    assert s["attainment"] == 0.5 and s["ttft_attainment"] == 0.75
    assert s["tpot_attainment"] == 0.75 and s["output_tok_s"] == 15.5
    by_rate = {1.0: {"attainment": 1.0}, 2.0: {"attainment": 0.95}, 3.0: {"attainment": 0.5},
               4.0: {"attainment": 0.92}}
    assert goodput(by_rate, 0.9) == 2.0  # 4.0 met it again, but past a miss it does not count
    assert goodput({1.0: {"attainment": 0.2}}, 0.9) == 0.0


def test_bench_pd_runs_both_systems_and_reports_ratios(tmp_path, capsys):
    out = tmp_path / "pd.json"
    pd.main(json_path=str(out), model="tiny:llama", dtype="float32", rates=(2.0,),
            num_requests=5, seed=5)
    report = json.loads(out.read_text())
    slo = SLO(report["slo"]["ttft_s"], report["slo"]["tpot_s"])
    assert set(report["systems"]) == {"colocated", "disaggregated"}
    for system in report["systems"].values():
        run = system["rates"]["2.0"]
        timings = [RequestTiming(*t) for t in run["timings"]]
        # Both systems, the baseline too, ran every request to its exact length.
        assert [t.tokens for t in timings] == run["max_tokens"] and len(timings) == 5
        assert run["long_requests"] == 2  # 30% of 5 prompts, rounded
        # The summary and the goodput are those of the recorded timings.
        assert run["attainment"] == sum(slo.met(t) for t in timings) / 5
        assert run["output_tok_s"] == pytest.approx(sum(run["max_tokens"]) / run["wall_s"])
        assert system["goodput_rps"] == (2.0 if run["attainment"] >= ATTAINMENT else 0.0)
    co, dis = (report["systems"][n] for n in ("colocated", "disaggregated"))
    ratios = report["ratios"]
    assert ratios["tpot_p99_rate"] == 2.0
    assert ratios["tpot_p99_pd_vs_colocated"] == pytest.approx(
        dis["rates"]["2.0"]["tpot_p99_s"] / co["rates"]["2.0"]["tpot_p99_s"])
    assert ratios["goodput_pd_vs_colocated"] == (
        dis["goodput_rps"] / co["goodput_rps"] if co["goodput_rps"] else None)
    for health in report["health"].values():
        assert health["block_violations"] == []
        assert all(w["num_running"] == 0 for w in health["workers"])
    # Colocated prefilled every prompt where it decoded; disaggregated moved the long ones' KV.
    workers = {n: h["workers"] for n, h in report["health"].items()}
    assert all(w["handoffs"] == 0 for w in workers["colocated"])
    (decode,) = [w for w in workers["disaggregated"] if w["role"] == "decode"]
    assert decode["handoffs"] >= 2 and decode["handoff_failures"] == 0
    # Each run kept what every worker of its system did meanwhile: the decode worker stepped at
    # least once for each token of the longest request after its first, and no more often than
    # the tokens made plus the local prompts' prefills (a step decodes every running request);
    # the prefill worker stepped for the remote prompts; both inside the run's wall time and on
    # their own CPU time.
    loads = {w["role"]: w for w in dis["rates"]["2.0"]["workers"]}
    assert set(loads) == {"prefill", "decode"}
    lengths = dis["rates"]["2.0"]["max_tokens"]
    assert max(lengths) - 1 <= loads["decode"]["steps"] <= sum(lengths) + len(lengths)
    assert loads["prefill"]["steps"] >= 2 and loads["prefill"]["forward_s"] > 0
    for w in loads.values():
        assert 0 < w["step_s"] <= w["wall_s"] and 0 < w["loop_cpu_s"] <= w["process_cpu_s"]
    assert sum(w["steps"] for w in co["rates"]["2.0"]["workers"]) > 0
    assert "goodput_pd_vs_colocated" in capsys.readouterr().out


def test_a_bench_pd_report_replays_through_the_planner(tmp_path):
    """The short form of the planner's calibration: a real `bench pd` run on a local Ray cluster,
    this machine's engine profiled, and the same requests through the simulated layouts. How close
    the figures come is `baton bench plan --replay`'s to measure, not a test's."""
    out = tmp_path / "pd.json"
    pd.main(json_path=str(out), model="tiny:llama", dtype="float32", rates=(1.0, 4.0),
            num_requests=6, seed=3)
    report = json.loads(out.read_text())
    profile = measure(model="tiny:llama", dtype="float32", prefill_lens=(16, 64, 256),
                      batches=(1, 4), contexts=(16, 128), decode_steps=4)
    replayed = plan_replay.replay(report, profile, plan_replay.cached_prefix_tokens("tiny:llama"))
    for name, system in report["systems"].items():
        sim = replayed["systems"][name]
        assert set(sim["rates"]) == set(system["rates"])  # every rate the system ran
        assert sim["goodput_real_rps"] == system["goodput_rps"]
        for rate, run in sim["rates"].items():
            measured = system["rates"][rate]
            assert run["real"]["ttft_p50_s"] == measured["ttft_p50_s"]
            assert run["sim"]["ttft_p50_s"] > 0 and run["sim"]["tpot_p50_s"] > 0
            assert run["error"]["ttft_p50"] == pytest.approx(
                run["sim"]["ttft_p50_s"] / measured["ttft_p50_s"] - 1)
            # The simulated router sends exactly the prompts with at least the threshold's
            # uncached tokens away, as the real decode worker does.
            cached = replayed["cached_prefix_tokens"]
            long = sum(n - cached >= pd.PREFILL_THRESHOLD for n in measured["prompt_tokens"])
            remote = run["sim"]["remote_prefills"]
            assert remote == (long if name == "disaggregated" else 0), (name, rate)
