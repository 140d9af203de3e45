"""`baton train-experts`: train a MoE model's routing-path predictor (policy `learned`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from baton.errors import ConfigError


def train_experts_command(
    model: Annotated[str, typer.Option(
        "--model", "-m", help="A Mixture-of-Experts model: a transformers directory, a hub id, "
        "or tiny:<arch>")],
    out: Annotated[Path, typer.Option(help="File the predictor is saved to (safetensors)")] = Path(
        "routing-predictor.safetensors"),
    tokens: Annotated[int, typer.Option(
        help="Tokens of routing to record (a fifth held out for scoring)")] = 8192,
    max_tokens: Annotated[int, typer.Option(
        help="Tokens the model writes per prompt (its answers are recorded too)")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for the train / held-out split")] = 0,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all)")] = None,
    output: Annotated[str, typer.Option(help="table or json")] = "table",
) -> None:
    """Record which experts the model routes its tokens to, fit a predictor of each later MoE
    layer's router logits from the MoE input of the layer before it, and score it on held-out
    prompts."""
    # torch and transformers load only when this command runs, so the rest of the CLI starts fast.
    from baton.ops import expert_traces

    if output not in ("table", "json"):
        raise ConfigError(f"--output must be 'table' or 'json', got {output!r}")
    console = Console(stderr=output == "json")
    with console.status("recording routes") as status:
        report = expert_traces.train_experts(
            model, out, tokens=tokens, max_tokens=max_tokens, seed=seed, dtype=dtype,
            device=device, threads=threads,
            on_tokens=lambda split, n: status.update(f"recording routes: {split} {n} tokens"))
    if output == "json":
        typer.echo(json.dumps(report.as_dict()))
        return
    k = report.shape.top_k
    table = Table(title=f"Routing predictor for {report.model}: held-out recall@{k} (= precision"
                        f"@{k}) of each layer's experts, from the MoE layer before it")
    for name in ("layer", "predictor", "most used experts", "chance"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for s in report.layers:
        table.add_row(str(s.layer), f"{s.recall_at_k:.1%}", f"{s.popular_recall_at_k:.1%}",
                      f"{s.chance:.1%}")
    console.print(table)
    secs = report.seconds
    console.print(f"{report.tokens['train']} tokens for training, {report.tokens['heldout']} "
                  f"held out; load {secs['load']:.0f}s, record {secs['record']:.0f}s, fit "
                  f"{secs['fit']:.1f}s")
    console.print(f"[green]saved[/] {report.out} (serve with moe_offload: {{policy: learned, "
                  f"predictor: {report.out}}})")
