"""Replaying a measured `bench pd` report, and the serving scale fitted to one."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from baton.cluster.planner.profile import Profile
from baton.cluster.planner.sim import SimResult
from baton.errors import ConfigError
from baton.ops.bench import plan_fit, plan_replay
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
    geometric mean, local prompts' and remote prefills' TTFTs the measured ones in their
    medians; a profile fitted already fits to the same values."""
    fit = plan_fit.fit_serving([REPORT], PROFILE, CACHED)
    # A serving worker is slower than its engine alone, a prefill worker no faster than that.
    assert fit.scale > 1 and fit.prefill_scale >= 1 and fit.handoff_s >= 0
    assert fit.request_s > 0  # this report's local prompts waited longer than their steps
    fitted = fit.apply(PROFILE)
    replayed = plan_replay.replay(REPORT, fitted, CACHED)
    ratios = []
    for system in replayed["systems"].values():
        lowest = min(system["rates"], key=float)
        run = system["rates"][lowest]
        ratios.append(run["sim"]["tpot_p50_s"] / run["real"]["tpot_p50_s"])
    # The factor is fitted on the unscaled replay: at the lowest rate TPOT grows almost in
    # proportion to it (a busier engine queues a little more).
    assert math.prod(ratios) ** (1 / len(ratios)) == pytest.approx(1.0, rel=0.03)
    again = plan_fit.fit_serving([REPORT], fitted, CACHED)
    assert dataclasses.astuple(again) == pytest.approx(dataclasses.astuple(fit))
    record = REPORT["systems"]["disaggregated"]["rates"]["0.25"]
    layout = plan_replay.layouts(REPORT, profile_cost(fitted))["disaggregated"]
    res = plan_replay.simulate(layout, record, CACHED)
    remote = np.asarray(record["prompt_tokens"]) - CACHED >= layout[1]
    gaps = np.asarray([t[0] for t in record["timings"]])[remote] - res.ttft[remote]
    if fit.handoff_s > 0:  # the handoff is the median gap left (none when it would be negative)
        assert abs(float(np.median(gaps))) < 0.01
    real, sim = plan_fit._ttfts([REPORT], fitted, CACHED, remote=False)
    assert len(real) > 10 and abs(float(np.median(real - sim))) < 0.005

    def error(remote: bool, **values: float) -> float:
        """The fit's objective over the remote prefills' TTFTs (`remote`) or the local prompts',
        with `values` in place and the constant fitted beside them (the median gap) left out."""
        trial = dataclasses.replace(fit, **values, **{"handoff_s" if remote else "request_s": 0.0})
        real, sim = plan_fit._ttfts([REPORT], trial.apply(PROFILE), CACHED, remote=remote)
        gap = max(0.0, float(np.median(real - sim)))
        return float(np.sum(((sim + gap) / real - 1) ** 2))

    # No prompt factor tried fits the local prompts better than the one chosen, and no prefill
    # factor the remote prefills.
    assert all(error(False, prompt_scale=fit.prompt_scale)
               <= error(False, prompt_scale=float(s)) + 1e-12 for s in plan_fit.PROMPT_SCALES)
    assert all(error(True, prefill_scale=fit.prefill_scale)
               <= error(True, prefill_scale=float(s)) + 1e-12 for s in plan_fit.PREFILL_SCALES)


def test_the_busy_handoff_is_fitted_where_the_decode_worker_was_loaded() -> None:
    """The extra handoff time for a stepping decode worker is the one of those tried that fits
    the remote prefills' TTFTs best at each system's highest rate within the SLOs."""
    fit = plan_fit.fit_serving([REPORT], PROFILE, CACHED)
    # Each system met the SLOs up to its goodput (above its lowest rate): that run is the one.
    loaded = [record for _, record in plan_fit._loaded_runs([REPORT], profile_cost(PROFILE))]
    assert loaded == [system["rates"][str(system["goodput_rps"])]
                      for system in REPORT["systems"].values()]

    def error(extra: float) -> float:
        trial = dataclasses.replace(fit, handoff_busy_s=extra)
        real, sim = plan_fit._ttfts([REPORT], trial.apply(PROFILE), CACHED, remote=True,
                                    runs=plan_fit._loaded_runs)
        return float(np.sum((sim / real - 1) ** 2))

    assert all(error(fit.handoff_busy_s) <= error(float(x)) + 1e-12
               for x in plan_fit.HANDOFF_BUSY)


def test_a_prefill_scale_slows_only_the_prefill_workers_steps() -> None:
    record = REPORT["systems"]["disaggregated"]["rates"]["0.25"]
    runs = {}
    for k in (1.0, 1.5):
        layout = plan_replay.layouts(REPORT, profile_cost(dataclasses.replace(
            PROFILE, prefill_scale=k)))["disaggregated"]
        runs[k] = plan_replay.simulate(layout, record, CACHED)
    remote = np.asarray(record["prompt_tokens"]) - CACHED >= plan_replay.layouts(
        REPORT, profile_cost(PROFILE))["disaggregated"][1]
    assert (runs[1.5].ttft[remote] > runs[1.0].ttft[remote]).all()
    assert runs[1.5].busy["prefill"] == pytest.approx(1.5 * runs[1.0].busy["prefill"], rel=1e-6)
    assert runs[1.5].busy["decode"] == pytest.approx(runs[1.0].busy["decode"], rel=0.05)


def test_a_prompt_scale_slows_the_prompts_served_where_they_decode() -> None:
    """Every prompt of the colocated pair takes longer to its first token; the disaggregated
    pair's prefill worker keeps its own pace."""
    runs: dict[float, dict[str, SimResult]] = {}
    for k in (1.0, 1.4):
        layouts = plan_replay.layouts(REPORT, profile_cost(dataclasses.replace(
            PROFILE, prompt_scale=k)))
        runs[k] = {name: plan_replay.simulate(layouts[name],
                                              REPORT["systems"][name]["rates"]["0.25"], CACHED)
                   for name in ("colocated", "disaggregated")}
    assert (runs[1.4]["colocated"].ttft > runs[1.0]["colocated"].ttft).all()
    # (a share of the run, which ends a little later)
    assert runs[1.4]["disaggregated"].busy["prefill"] == pytest.approx(
        runs[1.0]["disaggregated"].busy["prefill"], rel=1e-3)


def test_the_prompt_scale_and_request_path_are_recovered_from_ttfts_that_have_them() -> None:
    """A report whose latencies are the simulator's own under a known prompt factor and request
    path (no host contention, which the fit of these two leaves out) gets both back, near
    enough: the fit adds the path to TTFTs simulated without it, and a request that arrives
    later queues a little differently."""
    fit = plan_fit.fit_serving([REPORT], PROFILE, CACHED)
    made = dataclasses.replace(fit, prompt_scale=1.3, request_s=0.02, host_contention=0.0,
                               handoff_busy_s=0.0).apply(PROFILE)
    report = json.loads(json.dumps(REPORT))
    layouts = plan_replay.layouts(report, profile_cost(made))
    for name, system in report["systems"].items():
        for record in system["rates"].values():
            res = plan_replay.simulate(layouts[name], record, CACHED)
            record["timings"] = [[float(ttft), float(tpot), *rest[2:]] for ttft, tpot, rest
                                 in zip(res.ttft, res.tpot, record["timings"], strict=True)]
            record["tpot_p50_s"] = plan_replay.p50_or_none(res, res.tpot)
    again = plan_fit.fit_serving([report], PROFILE, CACHED)
    assert again.scale == pytest.approx(fit.scale, rel=0.02)
    assert again.prompt_scale == pytest.approx(1.3, abs=0.03)
    assert again.request_s == pytest.approx(0.02, abs=0.005)


def test_a_fit_on_two_reports_weighs_the_runs_of_both() -> None:
    """Fitted on two reports, each figure is fitted on their runs pooled: the same report twice
    changes nothing, and beside a second report whose remote prefills took 0.4 s longer, the
    prefill factor lands between the two reports' own, at (within 2% of) the best fit to their
    pooled remote prefills."""
    one = plan_fit.fit_serving([REPORT], PROFILE, CACHED)
    assert dataclasses.astuple(plan_fit.fit_serving([REPORT, REPORT], PROFILE, CACHED)) == (
        pytest.approx(dataclasses.astuple(one)))
    slower = json.loads(json.dumps(REPORT))
    record = slower["systems"]["disaggregated"]["rates"]["0.25"]
    threshold = plan_replay.layouts(REPORT, profile_cost(PROFILE))["disaggregated"][1]
    remote = np.asarray(record["prompt_tokens"]) - CACHED >= threshold
    assert remote.sum() >= 3
    for timing, away in zip(record["timings"], remote, strict=True):
        timing[0] += 0.4 if away else 0.0
    other = plan_fit.fit_serving([slower], PROFILE, CACHED)
    both = plan_fit.fit_serving([REPORT, slower], PROFILE, CACHED)
    # Only the remote prefills differ: the figures fitted before them agree.
    assert (both.prompt_scale, both.request_s) == pytest.approx((one.prompt_scale, one.request_s))
    assert one.prefill_scale < both.prefill_scale < other.prefill_scale

    def error(prefill_scale: float) -> float:
        trial = dataclasses.replace(both, prefill_scale=prefill_scale, handoff_s=0.0)
        real, sim = plan_fit._ttfts([REPORT, slower], trial.apply(PROFILE), CACHED, remote=True)
        assert len(real) == 2 * remote.sum()
        gap = max(0.0, float(np.median(real - sim)))
        return float(np.sum(((sim + gap) / real - 1) ** 2))

    # (fitted before the host contention, which fits the step factor again a little otherwise)
    assert error(both.prefill_scale) <= 1.02 * min(error(float(k))
                                                   for k in plan_fit.PREFILL_SCALES)


def test_a_fit_needs_a_report() -> None:
    with pytest.raises(ConfigError, match="at least one bench report"):
        plan_fit.fit_serving([], PROFILE, CACHED)


def test_requests_replay_with_the_speculation_they_were_served_with() -> None:
    """A report's forward passes per request make the replay decode each request in as many
    steps as it took: a request that gained 3 tokens a step finishes in a third of the steps."""
    record = json.loads(json.dumps(REPORT["systems"]["colocated"]["rates"]["0.25"]))
    tokens = [t[2] for t in record["timings"]]
    record["forward_passes"] = [[1 + math.ceil((n - 1) / 3), 2 * math.ceil((n - 1) / 3)]
                                if i % 2 == 0 else None for i, n in enumerate(tokens)]
    decoding = plan_replay.decoding(record)
    assert decoding is not None
    assert decoding[1] is None and decoding[0] == pytest.approx(
        ((tokens[0] - 1) / math.ceil((tokens[0] - 1) / 3), 3.0), rel=0.2)
    layout = plan_replay.layouts(REPORT, profile_cost(PROFILE))["colocated"]
    plain = plan_replay.simulate(layout, {**record, "forward_passes": None}, CACHED)
    fast = plan_replay.simulate(layout, record, CACHED)
    for i in (0, 2):
        assert fast.tpot[i] < 0.6 * plain.tpot[i]
    assert plan_replay.decoding({**record, "forward_passes": None}) is None


def test_the_replay_sets_each_roles_busy_share_beside_the_measured_one() -> None:
    """The report kept every worker's steps: the replay sets the measured share of the run each
    role stepped (mean over its workers) beside the simulated one, and a report without worker
    loads gets none."""
    replayed = plan_replay.replay(REPORT, plan_fit.fit_serving([REPORT], PROFILE, CACHED).apply(
        PROFILE), CACHED)
    for name, system in replayed["systems"].items():
        for rate, run in system["rates"].items():
            workers = REPORT["systems"][name]["rates"][rate]["workers"]
            roles = {w["role"] for w in workers}
            assert set(run["busy"]) == roles
            for role in roles:
                shares = [w["step_s"] / w["wall_s"] for w in workers if w["role"] == role]
                assert run["busy"][role]["real"] == pytest.approx(np.mean(shares))
                assert 0 < run["busy"][role]["sim"] <= 1
    # Where the decode worker is saturated, the simulated one is too.
    top = replayed["systems"]["disaggregated"]["rates"]["2.0"]["busy"]["decode"]
    assert top["real"] > 0.9 and top["sim"] > 0.9
    bare = json.loads(json.dumps(REPORT))
    for system in bare["systems"].values():
        for run in system["rates"].values():
            del run["workers"]
    assert all(not run["busy"] for system in plan_replay.replay(bare, PROFILE, CACHED)[
        "systems"].values() for run in system["rates"].values())


def test_each_request_is_followed_where_the_p50_jumps_between_two_groups() -> None:
    """Measured latencies 10% above the simulated ones, request by request, give a per-request
    error of 1/1.1 - 1 in every run; the TTFT p50's error also moves in a run whose middle two
    requests lie far apart, if the measured p50 is taken on the other side of the gap."""
    layout = plan_replay.layouts(REPORT, profile_cost(PROFILE))["colocated"]
    record = json.loads(json.dumps(REPORT["systems"]["colocated"]["rates"]["0.5"]))
    res = plan_replay.simulate(layout, record, CACHED)
    record["timings"] = [[1.1 * t, None if np.isnan(p) else 1.1 * p, int(n)]
                         for t, p, n in zip(res.ttft, res.tpot, res.output, strict=True)]
    slo = (REPORT["slo"]["ttft_s"], REPORT["slo"]["tpot_s"])
    run = plan_replay.replay_run(layout, record, slo, CACHED)
    assert run["request_error"]["ttft"] == pytest.approx(1 - 1 / 1.1)
    assert run["request_error"]["tpot"] == pytest.approx(1 - 1 / 1.1)
    ttfts = np.sort(res.ttft)
    middle = ttfts[len(ttfts) // 2 - 1 : len(ttfts) // 2 + 1]
    record["ttft_p50_s"] = 1.1 * float(middle[1])  # the upper of the two middle requests
    skewed = plan_replay.replay_run(layout, record, slo, CACHED)
    assert skewed["request_error"] == run["request_error"]
    assert skewed["error"]["ttft_p50"] == pytest.approx(
        float(np.median(ttfts)) / (1.1 * float(middle[1])) - 1)


def test_two_reports_of_the_same_requests_are_set_side_by_side() -> None:
    """Runs of the same requests (same arrivals and lengths) in two reports are compared, the
    first's p50 over the second's; runs of other requests are not."""
    again = json.loads(json.dumps(REPORT))
    run = again["systems"]["disaggregated"]["rates"]["1.0"]
    run["ttft_p50_s"] *= 2
    moved = again["systems"]["colocated"]["rates"]["0.5"]
    moved["arrivals"] = [a + 0.5 for a in moved["arrivals"]]  # other requests: not compared
    pairs = plan_replay.repeats({"first": REPORT, "second": again})
    ran = {(n, r) for n, system in REPORT["systems"].items() for r in system["rates"]}
    assert {(p["system"], p["rate"]) for p in pairs} == ran - {("colocated", "0.5")}
    for p in pairs:
        assert p["reports"] == ["first", "second"]
        one = REPORT["systems"][p["system"]]["rates"][p["rate"]]
        assert p["ttft_p50"][0] == one["ttft_p50_s"] and p["tpot_p50"][0] == one["tpot_p50_s"]
        doubled = (p["system"], p["rate"]) == ("disaggregated", "1.0")
        assert p["difference"]["ttft_p50"] == pytest.approx(-0.5 if doubled else 0.0)
        assert p["difference"]["tpot_p50"] == pytest.approx(0.0)
    assert plan_replay.repeats({"only": REPORT}) == []


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


@pytest.mark.parametrize("truth", [0.0, 0.6])
def test_the_host_contention_is_recovered_from_tpots_that_have_it(truth: float) -> None:
    """A report whose TPOT p50s are the simulator's own under a known contention (and the fit's
    other values) gets that contention back, near enough; with none, none."""
    fit = plan_fit.fit_serving([REPORT], PROFILE, CACHED)
    made = dataclasses.replace(fit, host_contention=truth).apply(PROFILE)
    report = json.loads(json.dumps(REPORT))
    layouts = plan_replay.layouts(report, profile_cost(made))
    for name, system in report["systems"].items():
        for record in system["rates"].values():
            res = plan_replay.simulate(layouts[name], record, CACHED)
            record["tpot_p50_s"] = plan_replay.p50_or_none(res, res.tpot)
    again = plan_fit.fit_serving([report], PROFILE, CACHED)
    assert again.host_contention == pytest.approx(truth, abs=0.15)
    if truth == 0:
        assert again.host_contention == 0
