"""`baton router train` and `baton router stats`: the method selector's model and how it chooses.

Both talk to the cluster's Redis (the one `baton up` started, or `--redis-url` / `--cluster`):
`train` fits a model on the performance history (or on a JSONL file of records) and stores it as
the next version, which every router loads within its poll interval; `stats` reads the stored
model and the selector's choices back from the history.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter, defaultdict
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from baton.errors import ClusterNotRunningError
from baton.ops.cli_options import Output, OutputOpt

router_app = typer.Typer(help="The router's method selector: train its model, see its choices.",
                         no_args_is_help=True)

RedisOpt = Annotated[str | None, typer.Option(
    "--redis-url", help="The cluster's Redis (default: the one `baton up` started)")]
ClusterOpt = Annotated[str | None, typer.Option(
    "--cluster", help="Cluster name (its Redis key namespace; default: the running one's)")]


def _state(redis_url: str | None, cluster: str | None):
    from baton.cluster.local_record import LocalCluster
    from baton.cluster.state import ClusterState

    if redis_url is None:
        local = LocalCluster.load()
        redis_url, cluster = local.redis_url, cluster or local.name
    if redis_url is None:
        raise ClusterNotRunningError("the running cluster has no Redis; pass --redis-url")
    state = ClusterState(redis_url, cluster or "default")
    if not state.available:
        raise ClusterNotRunningError(f"Redis at {redis_url} does not answer; is the cluster up?")
    return state


@router_app.command("train")
def train(
    from_history: Annotated[bool, typer.Option(  # noqa: ARG001 - the default, named for clarity
        "--from-history", help="Train on the cluster's performance history (the default)")] = True,
    from_file: Annotated[str | None, typer.Option(
        "--from", help="Train on a JSONL file of performance records instead")] = None,
    limit: Annotated[int, typer.Option(help="Newest history records to read")] = 20_000,
    redis_url: RedisOpt = None,
    cluster: ClusterOpt = None,
) -> None:
    """Train the selector's model and store it as the next version for every router."""
    from baton.router.selector_training import read_records
    from baton.router.selector_training import train as fit

    state = _state(redis_url, cluster)
    records = read_records(from_file) if from_file else state.history(limit=limit)
    source = from_file or f"history ({len(records)} records)"
    console = Console(stderr=True)
    with console.status(f"training on {source}"):
        model = fit(records)
    version = state.save_selector_model(model.to_bytes(), records=model.info.records,
                                        trained_at=model.info.trained_at)
    state.close()
    if version is None:
        raise ClusterNotRunningError("Redis went away before the model was stored; run again")
    typer.echo(f"selector model v{version}: {model.info.records} records, pools "
               f"{', '.join(model.pools)}, train RMSE {model.info.train_rmse:.3f} (log tok/s)")


def selection_stats(records: list[Any], model_info: dict[str, Any] | None) -> dict[str, Any]:
    """What `stats` shows, from history records and the stored model's info."""
    chosen = [r for r in records if r.selected_by == "selector"]
    by_method: dict[str, list[Any]] = defaultdict(list)
    for r in chosen:
        by_method[r.method].append(r)
    methods = {}
    for m, rs in sorted(by_method.items()):
        pred = [r.predicted_tokens_per_s for r in rs if r.predicted_tokens_per_s]
        got = [r.decode_tokens_per_s for r in rs if r.decode_tokens_per_s]
        methods[m] = {"chosen": len(rs), "explored": sum(r.explored for r in rs),
                      "predicted_tok_s": statistics.mean(pred) if pred else None,
                      "achieved_tok_s": statistics.mean(got) if got else None}
    errors = [abs(math.log(r.predicted_tokens_per_s / r.decode_tokens_per_s))
              for r in chosen if r.predicted_tokens_per_s and r.decode_tokens_per_s]
    regret = _estimated_regret(records)
    info = model_info or {}
    return {
        "model_version": info.get("version", 0),
        "model_age_s": time.time() - info["trained_at"] if "trained_at" in info else None,
        "model_records": info.get("records", 0),
        "requests": len(records), "selected": len(chosen),
        "by_request": Counter(r.method for r in records if r.selected_by == "request"),
        "exploration_share": (sum(r.explored for r in chosen) / len(chosen)) if chosen else 0.0,
        "methods": methods,
        "mean_abs_log_error": statistics.mean(errors) if errors else None,
        "estimated_regret": regret,
    }


def _estimated_regret(records: list[Any]) -> float | None:
    """Share of decode speed the selector's picks left behind, estimated from history: per
    prompt-length bucket, the best method's mean speed against what the picks achieved."""
    speed: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in records:
        if r.decode_tokens_per_s:
            speed[(r.prompt_tokens.bit_length(), r.method)].append(r.decode_tokens_per_s)
    best: dict[int, float] = {}
    for (bucket, _), v in speed.items():
        best[bucket] = max(best.get(bucket, 0.0), statistics.mean(v))
    losses = [max(0.0, 1 - r.decode_tokens_per_s / best[r.prompt_tokens.bit_length()])
              for r in records if r.selected_by == "selector" and r.decode_tokens_per_s]
    return statistics.mean(losses) if losses else None


@router_app.command("stats")
def stats(
    output: OutputOpt = Output.text,
    limit: Annotated[int, typer.Option(help="Newest history records to read")] = 10_000,
    redis_url: RedisOpt = None,
    cluster: ClusterOpt = None,
) -> None:
    """Methods chosen, predicted against achieved speed, exploration, model version and age."""
    state = _state(redis_url, cluster)
    stored = state.selector_model()
    out = selection_stats(state.history(limit=limit), stored[2] if stored else None)
    state.close()
    if output is Output.json:
        typer.echo(json.dumps(out, indent=2, default=dict))
        return
    console = Console()
    age = out["model_age_s"]
    console.print(f"selector model v{out['model_version']}"
                  + (f", trained {age / 60:.0f} min ago on {out['model_records']} records"
                     if age is not None else " (none stored: auto requests learn from scratch)"))
    table = Table(title=f"{out['selected']} of the last {out['requests']} requests chosen by "
                        "the selector")
    for col in ("method", "chosen", "explored", "predicted tok/s", "achieved tok/s"):
        table.add_column(col, justify="right")
    for m, row in out["methods"].items():
        table.add_row(m, str(row["chosen"]), str(row["explored"]), _num(row["predicted_tok_s"]),
                      _num(row["achieved_tok_s"]))
    console.print(table)
    console.print(f"exploration share {out['exploration_share']:.1%}; mean |log error| "
                  f"{_num(out['mean_abs_log_error'], 3)}; estimated regret "
                  f"{_num(out['estimated_regret'], 3)}")


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def token_agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Mean share of each reference output that the candidate reproduces before it diverges."""
    shares = []
    for ref, got in zip(reference, candidate, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b),
                    min(len(ref), len(got)))
        shares.append(same / max(len(ref), 1))
    return statistics.mean(shares) if shares else 0.0


@router_app.command("quality")
def quality(
    pool: Annotated[str, typer.Argument(help="The quantized pool's name")],
    quantization: Annotated[str, typer.Option(help="Its weight format: int8 or int4")] = "int8",
    model: Annotated[str, typer.Option(help="The served model")] = "default",
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per prompt")] = 48,
    threads: Annotated[int, typer.Option(help="CPU threads for the engines")] = 2,
    redis_url: RedisOpt = None,
    cluster: ClusterOpt = None,
) -> None:
    """Measure a quantized pool's token agreement with full precision and store it for the
    selector (lossy candidates are chosen only with a measured agreement)."""
    from baton.actors.engine import Engine
    from baton.ops.heads_prompts import QUESTIONS
    from baton.sampling import SamplingParams

    state = _state(redis_url, cluster)
    prompts = QUESTIONS[:12]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    console = Console(stderr=True)
    outputs = []
    for quant in (None, quantization):
        with console.status(f"greedy outputs with {quant or 'full-precision'} weights"):
            engine = Engine(model, num_threads=threads, quantization=quant)
            chats = [engine.apply_chat_template([{"role": "user", "content": p}])
                     for p in prompts]
            outputs.append([o.token_ids for o in engine.generate(chats, params)])
            del engine
    agreement = token_agreement(*outputs)
    state.set_quality(pool, agreement)
    state.close()
    typer.echo(f"pool {pool} ({quantization}): agreement {agreement:.3f} with full precision "
               f"over {len(prompts)} prompts; stored for the selector")
