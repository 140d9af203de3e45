"""The `baton` command line."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated

import typer
from rich.console import Console

from baton.errors import BatonError, ConfigError
from baton.ops import cluster_cmds, jobs_cmds, k8s_cmds
from baton.ops.cli_options import Output, OutputOpt
from baton.ops.moefy_cmd import moefy_command
from baton.ops.plan_cmds import plan_command, profile_command
from baton.ops.router_cmds import router_app
from baton.ops.train_experts import train_experts_command
from baton.ops.train_heads import train_heads_command

app = typer.Typer(
    name="baton",
    help="Baton: distributed LLM serving on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks against a baseline measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(router_app, name="router")

err = Console(stderr=True)
cluster_cmds.register(app)
k8s_cmds.register(app)
jobs_cmds.register(app)

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="'default' (SmolLM2-135M-Instruct), a transformers directory, a .gguf file, "
        "a hub id, or tiny:<arch>",
    ),
]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (or the user message with --chat)")],
    model: ModelOpt = "default",
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, (0, 1]")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k likeliest tokens; 0 keeps all")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable)")] = None,
    chat: Annotated[bool, typer.Option(help="Apply the model's chat template")] = False,
    logprobs: Annotated[int | None, typer.Option(help="Return top-k logprobs per token")] = None,
    output: OutputOpt = Output.text,
    dtype: Annotated[str, typer.Option(
        help="auto (this machine's fastest), bfloat16, float16 or float32")] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for the engine")] = None,
    method: Annotated[str, typer.Option(
        help="Acceleration method: none, ngram, lookahead, layerskip, draft, medusa")] = "none",
    num_speculative_tokens: Annotated[int | None, typer.Option(
        help="Draft tokens per step (default: adapted to acceptance)")] = None,
    draft_model: Annotated[str | None, typer.Option(
        help="Draft model for --method draft (path or id; same tokenizer)")] = None,
    medusa_heads: Annotated[str | None, typer.Option(
        help="Heads directory for --method medusa (from baton train-heads)")] = None,
) -> None:
    """Generate text from one prompt, streaming it as it comes."""
    from baton.actors.model_source import resolve
    from baton.prompts import check_text
    from baton.sampling import SamplingParams

    # Bad input is refused before the engine's imports (seconds) and the model's load.
    check_text(prompt)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=stop or [], logprobs=logprobs, method=method,
        num_speculative_tokens=num_speculative_tokens,
    )
    resolve(model)
    from baton.actors.engine import Engine

    engine = Engine(model=model, dtype=dtype, device=device, num_threads=threads,
                    max_num_seqs=1, methods=[method], draft_model=draft_model,
                    medusa_heads=medusa_heads)
    text = engine.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    final = None
    for out in engine.stream(text, params):
        if output is Output.text and out.delta_text:
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
        final = out
    assert final is not None
    if output is Output.text:
        sys.stdout.write("\n")
        return
    m = final.metrics
    report = {
        "model": engine.source.name,
        "text": final.text,
        "token_ids": final.token_ids,
        "finish_reason": final.finish_reason,
        "usage": {
            "prompt_tokens": m.num_prompt_tokens,
            "completion_tokens": len(final.token_ids),
            "cached_tokens": m.num_cached_tokens,
        },
        "ttft_s": m.ttft,
        "tpot_s": m.tpot(len(final.token_ids)),
        "spec_decode": {
            "method": m.method,
            "num_drafts": m.spec_num_drafts,
            "num_draft_tokens": m.spec_draft_tokens,
            "num_accepted_tokens": m.spec_accepted_tokens,
            "acceptance_rate": m.acceptance_rate,
            "mean_accepted_length": m.mean_accepted_length,
            "num_forward_passes": m.num_forward_passes,
        },
    }
    if final.logprobs is not None:
        report["logprobs"] = [
            {"token_id": lp.token_id, "logprob": lp.logprob,
             "top": {str(k): v for k, v in lp.top.items()}}
            for lp in final.logprobs
        ]
    sys.stdout.write(json.dumps(report) + "\n")


app.command("train-heads")(train_heads_command)
app.command("train-experts")(train_experts_command)
app.command("plan")(plan_command)
app.command("profile")(profile_command)
app.command("moefy")(moefy_command)


@app.command("prepare-model")
def prepare_model(model: ModelOpt = "default") -> None:
    """Resolve a model once (GGUF is converted into the local cache) and print where it lives.

    Also builds Baton's CPU decode kernel for this machine, so no engine waits on the compiler.
    """
    from baton.actors.model_source import resolve
    from baton.kernels import cpu_decode

    source = resolve(model)
    typer.echo(str(source.path or source.spec))
    built = cpu_decode.kernel() is not None
    typer.echo(f"CPU decode kernel: {'built' if built else 'not used on this machine'}", err=True)


@bench_app.command("engine")
def bench_engine(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    model: ModelOpt = "default",
    num_prompts: Annotated[int, typer.Option(help="Prompts in the workload")] = 16,
    dtype: Annotated[str, typer.Option(help="Same dtype for every system")] = "bfloat16",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all)")] = None,
    seed: Annotated[int, typer.Option(help="Workload seed")] = 0,
    max_output_tokens: Annotated[int, typer.Option(
        help="Longest output; lengths are log-uniform from 32 (or this, if lower) up to it")] = 256,
    quantizations: Annotated[list[str] | None, typer.Option(
        "--quantization", help="Also run Baton single-stream on int8 or int4 weights "
                               "(repeatable)")] = None,
) -> None:
    """Baton's engine against transformers generate, static batching and generate_batch."""
    from baton.ops.bench import engine as bench

    bench.main(json_path=json_path, model=model, num_prompts=num_prompts, dtype=dtype,
               threads=threads, seed=seed, max_output_tokens=max_output_tokens,
               quantizations=tuple(quantizations or ()))


@bench_app.command("actor")
def bench_actor(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    model: ModelOpt = "default",
    dtype: Annotated[str, typer.Option(help="Both systems' dtype")] = "bfloat16",
    repeats: Annotated[int, typer.Option(help="Requests per system, taking turns")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request")] = 64,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens per request")] = 32,
    core: Annotated[int | None, typer.Option(
        help="The one core both systems run on (default: the last this process may use)")] = None,
) -> None:
    """One request's TPOT through a Ray worker actor against its engine alone, same core."""
    from baton.ops.bench import actor as bench

    bench.main(json_path=json_path, model=model, dtype=dtype, repeats=repeats,
               max_tokens=max_tokens, prompt_tokens=prompt_tokens, core=core)


@bench_app.command("gpu")
def bench_gpu(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    batch: Annotated[int, typer.Option(help="The larger batch (besides 1)")] = 32,
    tokens: Annotated[int, typer.Option(help="Decode tokens per request")] = 128,
    rounds: Annotated[int, typer.Option(help="Timed rounds per case, after one warm-up")] = 3,
    model_dir: Annotated[str | None, typer.Option(
        help="Where the random-weight 1.1B Llama is saved (reused when present)")] = None,
) -> None:
    """Decode on a GPU at batch 1 and --batch, with and without CUDA graphs, as a share of HBM
    bandwidth (a random-weight 1.1B Llama built from its config)."""
    from baton.ops.bench import gpu_decode as bench

    bench.main(json_path=json_path, batch=batch, tokens=tokens, rounds=rounds,
               model_dir=model_dir)


@bench_app.command("kv")
def bench_kv(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    sizes: Annotated[list[float] | None, typer.Option(
        "--size", help="Payload MiB, all layers (repeatable; default 1, 4, 16, 64)")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per system and size")] = 15,
    overlap_mib: Annotated[float, typer.Option(help="Payload MiB for the overlap run")] = 16,
) -> None:
    """Baton's KV link against raw TCP and Ray's object store, and its compute overlap."""
    from baton.ops.bench import kv as bench

    bench.main(json_path=json_path, sizes_mib=tuple(sizes or bench.SIZES_MIB), repeats=repeats,
               overlap_mib=overlap_mib)


@bench_app.command("pd")
def bench_pd(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    model: ModelOpt = "default",
    dtype: Annotated[str, typer.Option(help="Both systems' dtype")] = "bfloat16",
    rates: Annotated[list[float] | None, typer.Option(
        "--rate", help="Request rate per second (repeatable; default 0.25 to 2)")] = None,
    num_requests: Annotated[int, typer.Option(help="Requests per rate")] = 32,
    ttft_scale: Annotated[float, typer.Option(
        help="TTFT SLO as a multiple of the longest prompt's TTFT alone")] = 3.0,
    tpot_scale: Annotated[float, typer.Option(
        help="TPOT SLO as a multiple of one request's TPOT alone")] = 2.5,
    seed: Annotated[int, typer.Option(help="Workload and arrival seed")] = 0,
) -> None:
    """Disaggregated prefill/decode against colocated workers: goodput, TTFT and TPOT."""
    from baton.ops.bench import pd as bench

    bench.main(json_path=json_path, model=model, dtype=dtype,
               rates=tuple(rates or bench.RATES), num_requests=num_requests,
               ttft_scale=ttft_scale, tpot_scale=tpot_scale, seed=seed)


@bench_app.command("serve")
def bench_serve(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    model: ModelOpt = "default",
    dtype: Annotated[str, typer.Option(help="Both systems' dtype")] = "bfloat16",
    rates: Annotated[list[float] | None, typer.Option(
        "--rate", help="Request rate per second (repeatable; default 0.25 to 6)")] = None,
    num_requests: Annotated[int, typer.Option(help="Requests per rate")] = 16,
    overhead_requests: Annotated[int, typer.Option(
        help="One-token requests per path for the router's own latency")] = 30,
    min_rate: Annotated[float, typer.Option(
        help="Lowest rate (halving from the lowest --rate) for a system that misses the SLOs "
             "at every rate swept")] = 0.0625,
    address: Annotated[str | None, typer.Option(
        help="gRPC address of a running `baton up` cluster (default: bring one up)")] = None,
    peer_continuous_batching: Annotated[bool, typer.Option(
        help="Run transformers serve with --continuous-batching (slower on CPU)")] = False,
    seed: Annotated[int, typer.Option(help="Workload and arrival seed")] = 0,
) -> None:
    """Baton's gRPC API against transformers serve: goodput, TTFT/TPOT, router overhead."""
    from baton.ops.bench import serve as bench

    bench.main(json_path=json_path, model=model, dtype=dtype,
               rates=tuple(rates or bench.RATES), num_requests=num_requests,
               overhead_requests=overhead_requests, min_rate=min_rate, address=address,
               peer_continuous_batching=peer_continuous_batching, seed=seed)


@bench_app.command("plan")
def bench_plan(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    hours: Annotated[float, typer.Option(help="Hours of traffic to simulate")] = 1.0,
    rate: Annotated[float, typer.Option(help="Requests per second")] = 700.0,
    baseline_s: Annotated[float, typer.Option(
        help="Seconds of traffic also simulated one event per iteration")] = 20.0,
    seed: Annotated[int, typer.Option(help="Workload and arrival seed")] = 0,
    calibrate: Annotated[bool, typer.Option(
        help="Also compare a real engine with the simulator fed its profile")] = True,
    replay: Annotated[list[str] | None, typer.Option(
        help="A `bench pd` or `bench serve` JSON report to replay (repeatable)")] = None,
    profile: Annotated[str | None, typer.Option(
        help="This machine's `baton profile` (with --replay)")] = None,
    fit_on: Annotated[list[str] | None, typer.Option(
        help="A bench report to fit the profile's serving scale to before replaying "
             "(repeatable: fitted on all of them at once)")] = None,
    save_profile: Annotated[str | None, typer.Option(
        help="Write the profile with its fitted serving scale here (for `baton plan`)")] = None,
) -> None:
    """The planner's simulator on a 1,000-GPU cluster (simulated seconds per wall second), and
    its calibration against a real engine and against bench pd / bench serve reports."""
    from baton.ops.bench import plan as bench

    bench.main(json_path=json_path, hours=hours, rate=rate, baseline_s=baseline_s, seed=seed,
               calibrate=calibrate, replay=tuple(replay or ()), profile=profile,
               fit_on=tuple(fit_on or ()), save_profile=save_profile)


@bench_app.command("kernels")
def bench_kernels(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
) -> None:
    """Each Triton kernel against its PyTorch reference and the device's peak bandwidth (CUDA)."""
    from baton.ops.bench import kernels as bench

    bench.main(json_path=json_path)


@bench_app.command("spec")
def bench_spec(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    workload: Annotated[str | None, typer.Option(
        help="JSONL workload: task, prompt or messages, max_tokens (default: built-in)")] = None,
    methods: Annotated[str, typer.Option(
        help="Comma-separated methods compared with none")] = "ngram,lookahead,layerskip",
    draft_model: Annotated[str | None, typer.Option(
        help="Draft model for 'draft' (adds it to the methods)")] = None,
    medusa_heads: Annotated[str | None, typer.Option(
        help="Heads directory for 'medusa', from baton train-heads (adds it to the methods)")
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for the engine")] = 2,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    model: Annotated[str, typer.Option(
        "--model", "-m", help="'default', a transformers directory, a .gguf file or tiny:<arch>")
    ] = "default",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    batch1_only: Annotated[bool, typer.Option(
        "--batch1-only", help="Leave out the 16-concurrent part")] = False,
) -> None:
    """Acceleration methods against none per task family, at batch 1 and 16 concurrent."""
    from baton.ops.bench import spec as bench
    from baton.ops.bench.report import run_and_report

    names = [m.strip() for m in methods.split(",") if m.strip()]
    run_and_report(lambda c: bench.run_spec_bench(workload, names, draft_model, threads, dtype, c,
                                                  medusa_heads=medusa_heads, model=model,
                                                  device=device, concurrent=not batch1_only),
                   bench.show, json_path)


@bench_app.command("select")
def bench_select(
    json_path: Annotated[str | None, typer.Option(
        "--json", help="Write the report here (the matrix and regret plot go next to it)")] = None,
    workload: Annotated[str | None, typer.Option(
        help="JSONL workload: task, prompt or messages, max_tokens (default: built-in)")] = None,
    train: Annotated[str | None, typer.Option(
        help="JSONL workload to train on instead of leave-one-family-out")] = None,
    matrix: Annotated[str | None, typer.Option(
        help="Score a candidate matrix measured before instead of measuring")] = None,
    methods: Annotated[str, typer.Option(
        help="Comma-separated candidate methods besides none")] = "ngram,lookahead,layerskip",
    threads: Annotated[int, typer.Option(help="CPU threads for the engine")] = 2,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
) -> None:
    """The method selector against random, the best fixed method, a rule and the oracle."""
    from baton.ops.bench import select as bench
    from baton.ops.bench.report import run_and_report

    names = [m.strip() for m in methods.split(",") if m.strip()]
    run_and_report(lambda c: bench.run_select_bench(json_path, workload, train, matrix, names,
                                                    threads, dtype, c),
                   bench.show, json_path)


@bench_app.command("moe")
def bench_moe(
    json_path: Annotated[str | None, typer.Option("--json", help="Write the report here")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="A MoE model: a transformers directory or tiny:<arch> (default: "
        "the default model moefied into 16 experts, top-4, made once)")] = None,
    policies: Annotated[str | None, typer.Option(
        help="Comma-separated policies (default: all the model can run)")] = None,
    budgets: Annotated[str, typer.Option(
        help="Comma-separated fractions of all experts resident")] = "0.125,0.25,0.5",
    tier: Annotated[str, typer.Option(help="host or disk")] = "disk",
    num_requests: Annotated[int, typer.Option(help="Requests at batch 1")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request")] = 32,
    workload: Annotated[str | None, typer.Option(
        help="JSONL workload: prompt or messages per line (default: built-in)")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for the engine")] = 2,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    predictor: Annotated[str | None, typer.Option(
        help="Routing predictor for the learned policy (default: train one first)")] = None,
    pregate: Annotated[bool, typer.Option(
        "--pregate", help="Without --model: the pre-gated moefied default model (one router "
        "for all layers, `baton moefy --pregate`)")] = False,
    grouping: Annotated[bool, typer.Option(
        "--grouping", help="Also serve the whole workload in batches of 4 grouped by the "
        "requests' experts against a shuffled order (does grouping read less?)")] = False,
) -> None:
    """MoE expert offload (every budget and policy) against the all-resident model."""
    from baton.ops.bench import moe as bench
    from baton.ops.bench.report import run_and_report

    names = [p.strip() for p in policies.split(",")] if policies else None
    try:
        fractions = [float(b) for b in budgets.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--budgets takes fractions like 0.125,0.25; got {budgets!r}") from exc
    run_and_report(lambda c: bench.run_moe_bench(model, names, fractions, tier, num_requests,
                                                 max_tokens, threads, dtype, device, workload,
                                                 predictor, c, pregate, grouping),
                   bench.show, json_path)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except BatonError as exc:
        err.print(f"[bold red]error[/]: {type(exc).__name__}: {exc.message}")
        sys.exit(2)


if __name__ == "__main__":
    main()
