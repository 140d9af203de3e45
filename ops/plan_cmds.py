"""`baton plan` (the layout with the most goodput per dollar under SLOs, and its deployment
values) and `baton profile` (this machine's engine timings, which the planner is calibrated by)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from baton.errors import ConfigError
from baton.ops.cli_options import Output, OutputOpt

if TYPE_CHECKING:  # the planner (numpy, the router's decision code, Ray) loads when `plan` runs
    from baton.cluster.planner.plan import PlanResult
    from baton.cluster.planner.sim import Speculation

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$")


def parse_duration(text: str, option: str) -> float:
    """Seconds of `1s`, `50ms` or `0.5` (seconds); `ConfigError` naming the option otherwise."""
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"{option} {text!r} is not a duration; write e.g. 1s, 50ms or 0.5")
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "ms" else value


def _link_efficiency(kv_json: str | None) -> float | None:
    if kv_json is None:
        return None
    try:
        return float(json.loads(Path(kv_json).read_text())["ratios"]["grpc_vs_raw_tcp"])
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{kv_json} is not a `baton bench kv` report ({exc})") from exc


def _names(text: str | None) -> list[str] | None:
    return [g.strip() for g in text.split(",") if g.strip()] if text else None


def parse_speculation(text: str | None) -> Speculation | None:
    """`--speculation TOKENS_PER_STEP:VERIFIED_TOKENS[:SHARE]` (None: no method)."""
    if not text:
        return None
    from baton.cluster.planner.sim import Speculation

    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError(text)
        share = float(parts[2]) if len(parts) == 3 else 1.0
        return Speculation(float(parts[0]), int(parts[1]), share)
    except ValueError as exc:
        raise ConfigError(f"--speculation takes TOKENS_PER_STEP:VERIFIED_TOKENS[:SHARE] (e.g. "
                          f"2.2:5:0.5), not {text!r}") from exc


def plan_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Built-in config (llama-3-8b, "
                                       "llama-3-70b, mixtral-8x7b, smollm2-135m), a config.json, "
                                       "or 'default'")] = "default",
    workload: Annotated[str, typer.Option(help="coding, conversation (Splitwise traces), "
                                          "bench-pd or bench-serve")] = "conversation",
    trace: Annotated[str | None, typer.Option(help="Replay a trace (Splitwise CSV or JSONL); "
                                              "its rate is the target")] = None,
    slo_ttft: Annotated[str, typer.Option(help="TTFT SLO, e.g. 1s")] = "1s",
    slo_tpot: Annotated[str, typer.Option(help="TPOT SLO, e.g. 50ms")] = "50ms",
    budget: Annotated[float | None, typer.Option(help="Most $/h to spend")] = None,
    rate: Annotated[float | None, typer.Option(help="Requests/s to serve: plan the cheapest "
                                               "layout for it")] = None,
    gpus: Annotated[str | None, typer.Option(help="Comma-separated GPU types to consider")] = None,
    decode_gpus: Annotated[str | None, typer.Option(help="GPU types for decode pools (default: "
                                                    "--gpus)")] = None,
    catalog: Annotated[str | None, typer.Option(help="YAML overriding GPU prices/figures")] = None,
    profile: Annotated[str | None, typer.Option(help="A `baton profile` file: a CPU machine to "
                                                "plan, or a GPU to calibrate")] = None,
    cores: Annotated[int, typer.Option(help="CPU machine cores (with a CPU profile)")] = 2,
    kv_json: Annotated[str | None, typer.Option(help="A `baton bench kv` report: the KV link's "
                                                "share of line rate")] = None,
    thresholds: Annotated[str | None, typer.Option(
        help="Prefill thresholds to try, comma-separated (default: the planner's own)")]
        = None,
    speculation: Annotated[str | None, typer.Option(
        help="An acceleration method as `baton bench spec` measured it: TOKENS_PER_STEP:"
             "VERIFIED_TOKENS[:SHARE], e.g. 2.2:5:0.5 (mean accepted length + 1, draft + 1, "
             "share of requests)")] = None,
    requests: Annotated[int, typer.Option(help="Simulated requests per rate")] = 400,
    seed: Annotated[int, typer.Option(help="Workload seed")] = 0,
    values: Annotated[str | None, typer.Option(help="Write the winner's deployment values "
                                               "(YAML with `cluster:`) here")] = None,
    plot_path: Annotated[str | None, typer.Option("--plot", help="PNG of goodput against cost")]
        = None,
    top: Annotated[int, typer.Option(help="Rows of the table")] = 12,
    output: OutputOpt = Output.text,
) -> None:
    """Find the pool layout with the most goodput per dollar under TTFT/TPOT SLOs."""
    from baton.cluster.planner.candidates import THRESHOLDS
    from baton.cluster.planner.plan import PlanRequest, plan
    from baton.cluster.planner.search import SLO

    req = PlanRequest(
        model=model, workload=workload, trace=trace,
        slo=SLO(parse_duration(slo_ttft, "--slo-ttft"), parse_duration(slo_tpot, "--slo-tpot")),
        budget=budget, rate=rate, catalog=catalog, profile=profile, cores=cores,
        link_efficiency=_link_efficiency(kv_json),
        thresholds=[int(t) for t in _names(thresholds) or []] or THRESHOLDS,
        speculation=parse_speculation(speculation), num_requests=requests, seed=seed)
    if gpus:
        req.gpus = _names(gpus) or req.gpus
    req.decode_gpus = _names(decode_gpus)
    console = Console(stderr=output is Output.json)
    with console.status("simulating layouts"):
        result = plan(req)
    if values:
        Path(values).write_text(yaml.safe_dump(result.winner.values(result.serve_model),
                                               sort_keys=False))
    if plot_path:
        from baton.ops.plan_plot import plot  # matplotlib only when a plot is asked for

        plot(result.ranked, result.winner, plot_path,
             f"{result.model.name}, {req.trace or req.workload}: TTFT <= {req.slo.ttft_s:g} s, "
             f"TPOT <= {req.slo.tpot_s * 1000:g} ms ({req.slo.attainment:.0%})")
    if output is Output.json:
        typer.echo(json.dumps(_report(result)))
        return
    _show(result, console, top, values, plot_path)


def _report(result: PlanResult) -> dict:
    return {
        "model": result.model.name,
        "winner": {"layout": result.winner.label(), "price_per_hour": result.winner.price_per_hour,
                   "goodput_rps": result.winner_goodput_rps,
                   "verified_by_simulation": result.winner_verified,
                   "values": result.winner.values(result.serve_model)},
        "layouts": [{"layout": e.layout.label(), "kind": e.layout.kind,
                     "price_per_hour": e.price_per_hour, "goodput_rps": e.goodput_rps,
                     "goodput_per_dollar_hour": e.per_dollar, "ttft_p50_s": e.ttft_p50_s,
                     "tpot_p50_s": e.tpot_p50_s} for e in result.ranked],
    }


def _show(result: PlanResult, console: Console, top: int, values: str | None,
          plot_path: str | None) -> None:
    table = Table(title=f"layouts for {result.model.name}, best goodput per dollar first")
    for col in ("layout", "$/h", "goodput req/s", "req/s per $/h", "TTFT p50", "TPOT p50"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for e in result.ranked[:top]:
        table.add_row(e.layout.label(), f"{e.price_per_hour:.2f}", f"{e.goodput_rps:.2f}",
                      f"{e.per_dollar:.3f}", f"{e.ttft_p50_s * 1000:.0f} ms",
                      f"{e.tpot_p50_s * 1000:.1f} ms")
    console.print(table)
    w = result.winner
    if result.target_rate is not None:
        how = f"serves {result.target_rate:g} req/s within the SLOs (simulated)"
    elif result.winner_verified:
        how = f"{result.winner_goodput_rps:.2f} req/s within the SLOs (simulated)"
    else:
        how = (f"an estimated {result.winner_goodput_rps:.2f} req/s (the best layout scaled to "
               "the budget; simulated at that rate it missed the SLOs, so plan with --rate)")
    console.print(f"winner: [bold]{w.label()}[/] at ${w.price_per_hour:.2f}/h, {how}")
    if values:
        console.print(f"deployment values written to {values}")
    if plot_path:
        console.print(f"plot written to {plot_path}")


def profile_command(
    out: Annotated[str, typer.Option("--out", "-o", help="Profile file to write")] =
        "baton-profile.json",
    model: Annotated[str, typer.Option("--model", "-m", help="Model to time")] = "default",
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    threads: Annotated[int, typer.Option(help="CPU threads of one worker")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    gpu: Annotated[str | None, typer.Option(help="Catalog name of this GPU (with cuda)")] = None,
    prefill_lens: Annotated[str | None, typer.Option(
        help="Comma-separated prompt lengths to time (default 16,64,256,1024)")] = None,
    batches: Annotated[str | None, typer.Option(
        help="Comma-separated decode batch sizes (default 1,4,8; a GPU's decode stays "
        "memory-bound far beyond)")] = None,
    contexts: Annotated[str | None, typer.Option(
        help="Comma-separated decode context lengths (default 16,256,1024)")] = None,
    kv_cache_gib: Annotated[float | None, typer.Option(
        help="KV cache of the timed engine, GiB (the largest batch at the longest context "
        "must fit)")] = None,
) -> None:
    """Time this machine's engine (prefill by length, decode by batch and context) for `plan`."""
    from baton.ops import profile_run  # loads torch: only for this command

    grid = {name: _int_list(name, text) for name, text in (
        ("prefill_lens", prefill_lens), ("batches", batches), ("contexts", contexts)) if text}
    console = Console(stderr=True)
    prof = profile_run.measure(
        model=model, dtype=dtype, threads=threads, device=device, gpu=gpu,
        kv_cache_memory=int(kv_cache_gib * 2**30) if kv_cache_gib else None, say=console.print,
        **grid)
    prof.save(out)
    console.print(f"profile written to {out}")


def _int_list(name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in _names(text) or ())
    except ValueError as exc:
        raise ConfigError(f"--{name.replace('_', '-')} takes positive integers separated by "
                          f"commas, like 1,8,32; got {text!r}") from exc
    if not values or min(values) < 1:
        raise ConfigError(f"--{name.replace('_', '-')} takes positive integers; got {text!r}")
    return values
