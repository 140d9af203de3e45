"""`baton bench plan`: how fast the planner's simulator runs a large cluster, against itself
without event skipping.

A 1,000-GPU cluster (llama-3-70b; prefill on H100, decode on A100-80G, four GPUs per replica)
takes Poisson traffic of the Splitwise coding trace for `hours` of simulated time. The baseline is
the same simulator with one event per decode iteration, over a short window of the same traffic
(it is too slow for the hour); both runs' TTFT/TPOT p50 over that window are compared, so the
report also says what event skipping costs in accuracy. Figure: simulated seconds per wall second.

With `replays`, reports of `baton bench pd` / `baton bench serve` run on this machine are replayed
through the simulator fed this machine's `profile` (`plan_replay`): per system and rate, the
measured and simulated TTFT/TPOT p50, attainment and goodput. With `fit_on`, the profile's
serving scale is first fitted to those reports together (and the profile so fitted saved to
`save_profile`), so the other replays check it.

With `calibrate`, a real engine (`CALIBRATION_MODEL`, in process) is profiled, then run open-loop
at rising rates beside the simulator fed that profile (`plan_calibration.sweep`): TTFT/TPOT p50
errors per rate and both goodputs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from baton.actors.engine import Engine
from baton.cluster.planner.catalog import Catalog
from baton.cluster.planner.cost import CostModel
from baton.cluster.planner.model import load_model
from baton.cluster.planner.profile import Profile
from baton.cluster.planner.sim import ClusterSim, ReplicaSpec, SimResult
from baton.cluster.planner.workload import get_workload, poisson
from baton.errors import ConfigError
from baton.ops.bench import plan_calibration, plan_fit, plan_replay
from baton.ops.bench.machine import machine_info
from baton.ops.bench.report import run_and_report
from baton.ops.profile_run import measure

MODEL = "llama-3-70b"
WORKLOAD = "coding"
PREFILL = ("H100", 4, 180)  # (GPU, GPUs per replica, replicas)
DECODE = ("A100-80G", 4, 70)
PREFILL_THRESHOLD = 64
CALIBRATION_MODEL = "tiny:llama"
CALIBRATION_RATES = (10.0, 20.0, 40.0, 80.0)


def cluster() -> tuple[list[ReplicaSpec], int]:
    """The simulated cluster's replicas and its GPU count."""
    cat, model = Catalog(), load_model(MODEL)
    specs = [ReplicaSpec(role, CostModel(cat.get(gpu), model, tp), n)
             for role, (gpu, tp, n) in (("prefill", PREFILL), ("decode", DECODE))]
    return specs, sum(s.cost.tp * s.count for s in specs)


def _timed_run(specs: list[ReplicaSpec], arrivals: np.ndarray, prompts: np.ndarray,
               outputs: np.ndarray, skipping: bool) -> tuple[SimResult, float]:
    sim = ClusterSim(specs, PREFILL_THRESHOLD, event_skipping=skipping)
    t0 = time.perf_counter()
    res = sim.run(arrivals, prompts, outputs)
    return res, time.perf_counter() - t0


def _summary(res: SimResult, wall: float, simulated_s: float) -> dict[str, Any]:
    return {"requests": len(res.ttft), "simulated_s": simulated_s, "wall_s": wall,
            "simulated_seconds_per_wall_second": simulated_s / wall, "events": res.events,
            "iterations": res.iterations, "ttft_p50_s": res.p50(res.ttft),
            "tpot_p50_s": res.p50(res.tpot), "busy": res.busy,
            "preemptions": res.preemptions}


def calibration(seed: int) -> dict[str, Any]:
    """A real engine against the simulator fed its own profile (see the module's doc)."""
    profile = measure(model=CALIBRATION_MODEL, dtype="float32", threads=1,
                      prefill_lens=(16, 64, 256), batches=(1, 4, 16), contexts=(16, 128),
                      decode_steps=9, repeats=5)
    engine = Engine(model=CALIBRATION_MODEL, dtype="float32", num_threads=1,
                    max_num_batched_tokens=256, max_num_seqs=16)
    out = plan_calibration.sweep(engine, profile, CALIBRATION_RATES, 60, (16, 200), (8, 40),
                                 (3.0, 2.5), seed)
    return {"model": CALIBRATION_MODEL, **out}


def _bench_report(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"bench report {p} does not exist")
    return json.loads(p.read_text())


Replays = tuple[dict[str, Any] | None, dict[str, Any], list[dict[str, Any]]]


def replays(paths: Sequence[str], profile_path: str | None, fit_on: Sequence[str] = (),
            save_profile: str | None = None) -> Replays:
    """What serving adds to the profile, fitted to the reports at `fit_on` (none: not fitted),
    each bench report at `paths` replayed on the profile (see `plan_replay`), and their runs of
    the same requests side by side (`plan_replay.repeats`)."""
    if not paths and not fit_on:
        return None, {}, []
    if profile_path is None:
        raise ConfigError("--replay and --fit-on need --profile: a `baton profile` of this "
                          "machine's engine to cost the replayed layouts")
    reports = {str(path): _bench_report(path) for path in paths}
    profile = Profile.load(profile_path)
    cached = plan_replay.cached_prefix_tokens(profile.model)  # the model it profiled
    fitted = None
    if fit_on:
        fit = plan_fit.fit_serving([_bench_report(p) for p in fit_on], profile, cached)
        profile = fit.apply(profile)
        fitted = {"fitted_on": list(fit_on), **dataclasses.asdict(fit)}
        if save_profile:
            profile.save(save_profile)
    return (fitted, {path: plan_replay.replay(report, profile, cached)
                     for path, report in reports.items()}, plan_replay.repeats(reports))


def run(*, hours: float = 1.0, rate: float = 700.0, baseline_s: float = 20.0, seed: int = 0,
        calibrate: bool = True, replay: Sequence[str] = (), profile: str | None = None,
        fit_on: Sequence[str] = (), save_profile: str | None = None,
        progress: Console | None = None) -> dict[str, Any]:
    """Simulate `hours` of traffic at `rate` requests/s, and `baseline_s` of it both ways."""
    say = progress.print if progress else (lambda _: None)
    fitted, replayed, repeats = replays(replay, profile, fit_on, save_profile)
    calib = None
    if calibrate:
        say(f"calibration: profiling {CALIBRATION_MODEL}, then real and simulated runs")
        calib = calibration(seed)
    specs, gpus = cluster()
    rng = np.random.default_rng(seed)
    n = int(rate * hours * 3600)
    prompts, outputs = get_workload(WORKLOAD).sample(n, rng)
    arrivals = poisson(n, rate, rng)
    m = max(2, int(rate * baseline_s))
    say(f"baseline: {m} requests ({baseline_s:g} s of traffic) one event per iteration")
    base, base_wall = _timed_run(specs, arrivals[:m], prompts[:m], outputs[:m], False)
    short, short_wall = _timed_run(specs, arrivals[:m], prompts[:m], outputs[:m], True)
    say(f"{gpus} GPUs, {n} requests ({hours:g} h at {rate:g}/s) with event skipping")
    full, wall = _timed_run(specs, arrivals, prompts, outputs, True)
    sim_s = float(arrivals[-1])
    window = {"skipping": _summary(short, short_wall, float(arrivals[m - 1])),
              "per_iteration": _summary(base, base_wall, float(arrivals[m - 1]))}
    return {
        "machine": machine_info(1),
        "cluster": {"model": MODEL, "gpus": gpus, "workload": WORKLOAD, "rate_rps": rate,
                    "prefill": dict(zip(("gpu", "tp", "replicas"), PREFILL, strict=True)),
                    "decode": dict(zip(("gpu", "tp", "replicas"), DECODE, strict=True)),
                    "prefill_threshold": PREFILL_THRESHOLD},
        "full": _summary(full, wall, sim_s),
        "window": window,
        "calibration": calib,
        "serving_fit": fitted,
        "replays": replayed,
        "repeats": repeats,
        "ratios": {
            "simulated_seconds_per_wall_second": sim_s / wall,
            "skipping_speedup_vs_per_iteration": base_wall / short_wall,
            "ttft_p50_skipping_vs_per_iteration": window["skipping"]["ttft_p50_s"]
            / window["per_iteration"]["ttft_p50_s"],
            "tpot_p50_skipping_vs_per_iteration": window["skipping"]["tpot_p50_s"]
            / window["per_iteration"]["tpot_p50_s"],
            **_replay_ratios(replayed),
            **_repeat_ratios(repeats),
        },
    }


def _replay_ratios(replayed: dict[str, Any]) -> dict[str, float]:
    """The worst replay errors over every replayed report (none: no ratios)."""
    worst = [r["worst_abs_error_within_slo"] for r in replayed.values()]
    if not worst:
        return {}
    return {"replay_ttft_p50_worst_abs_error": max(w["ttft_p50"] for w in worst),
            "replay_tpot_p50_worst_abs_error": max(w["tpot_p50"] for w in worst),
            "replay_goodput_worst_rate_steps": max(w["goodput_rate_steps"] for w in worst),
            # The worst run's median per-request error (see plan_replay._request_errors).
            **{f"replay_{k}_per_request_worst_median_abs_error":
               max(w[f"{k}_per_request"] for w in worst) for k in ("ttft", "tpot")}}


def _repeat_ratios(repeats: list[dict[str, Any]]) -> dict[str, float]:
    """The largest difference between two measurements of the same requests (none: no ratios)."""
    if not repeats:
        return {}
    return {f"repeat_{k}_worst_abs_difference": max(abs(r["difference"][k] or 0.0)
                                                    for r in repeats)
            for k in plan_replay.P50S}


def show(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"simulating {report['cluster']['gpus']} GPUs "
                        f"({report['cluster']['model']}, {report['cluster']['workload']})")
    for col in ("run", "requests", "simulated s", "wall s", "sim s / wall s", "TTFT p50",
                "TPOT p50"):
        table.add_column(col, justify="right")
    rows = [("full, skipping", report["full"]), *[(f"window, {k}", v)
                                                  for k, v in report["window"].items()]]
    for name, s in rows:
        table.add_row(name, str(s["requests"]), f"{s['simulated_s']:.0f}", f"{s['wall_s']:.1f}",
                      f"{s['simulated_seconds_per_wall_second']:.1f}",
                      f"{s['ttft_p50_s'] * 1000:.0f} ms", f"{s['tpot_p50_s'] * 1000:.1f} ms")
    console.print(table)
    for k, v in report["ratios"].items():
        console.print(f"{k}: {v:.3g}")
    calib = report.get("calibration")
    if calib:
        for r in calib["runs"]:
            console.print(f"calibration {calib['model']} at {r['rate']:g}/s: TTFT p50 error "
                          f"{r['error']['ttft_p50']:+.0%}, TPOT p50 error "
                          f"{r['error']['tpot_p50']:+.0%}, attainment real "
                          f"{r['real']['attainment']:.0%} / sim {r['sim']['attainment']:.0%}")
        console.print(f"calibration goodput: real {calib['goodput_real_rps']:g}/s, simulated "
                      f"{calib['goodput_sim_rps']:g}/s")
    if fit := report.get("serving_fit"):
        console.print(f"serving scale {fit['scale']:.3f}, prefill scale {fit['prefill_scale']:.2f},"
                      f" prompt scale {fit.get('prompt_scale', 1.0):.2f}, request path "
                      f"{fit.get('request_s', 0.0) * 1000:.0f} ms and handoff "
                      f"{fit['handoff_s'] * 1000:.0f} ms (+"
                      f"{fit.get('handoff_busy_s', 0.0) * 1000:.0f} ms to a stepping decode "
                      f"worker), host contention {fit.get('host_contention', 0.0):.2f}, fitted "
                      f"on {', '.join(fit['fitted_on'])}")
    for path, rep in report.get("replays", {}).items():
        _show_replay(path, rep, console)
    if repeats := report.get("repeats"):
        _show_repeats(repeats, console)


def _show_replay(path: str, rep: dict[str, Any], console: Console) -> None:
    table = Table(title=f"replayed {path} on a {rep['profile_device']} profile",
                  caption="TTFT in s, TPOT in ms, busy: share of the run a role's engines "
                          "stepped; sim / measured")
    for col in ("system", "req/s", "TTFT p50", "TPOT p50", "attainment", "busy"):
        table.add_column(col, justify="right")
    for name, system in rep["systems"].items():
        for rate, run in system["rates"].items():
            real, sim = run["real"], run["sim"]
            busy = "\n".join(f"{role} {b['sim']:.2f}/{b['real']:.2f}"
                              for role, b in run.get("busy", {}).items())
            table.add_row(name, rate, f"{_num(sim['ttft_p50_s'])} / {_num(real['ttft_p50_s'])}",
                          f"{_num(sim['tpot_p50_s'], 1000)} / {_num(real['tpot_p50_s'], 1000)}",
                          f"{sim['attainment']:.0%} / {real['attainment']:.0%}", busy)
        table.add_row(name, "goodput", "", "",
                      f"{system['goodput_sim_rps']:g} / {system['goodput_real_rps']:g} req/s", "")
    console.print(table)


def _show_repeats(repeats: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="the same requests measured twice",
                  caption="TTFT in s, TPOT in ms; first / second report (difference)")
    for col in ("reports", "system", "req/s", "TTFT p50", "TPOT p50"):
        table.add_column(col, justify="right")
    for r in repeats:
        (t1, t2), (p1, p2) = r["ttft_p50"], r["tpot_p50"]
        diff = r["difference"]
        table.add_row(" / ".join(Path(p).name for p in r["reports"]), r["system"], r["rate"],
                      f"{_num(t1)} / {_num(t2)} ({_pct(diff['ttft_p50'])})",
                      f"{_num(p1, 1000)} / {_num(p2, 1000)} ({_pct(diff['tpot_p50'])})")
    console.print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"


def _num(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.3g}"


def main(*, json_path: str | None = None, **kw: Any) -> dict[str, Any]:
    return run_and_report(lambda progress: run(progress=progress, **kw), show, json_path)
