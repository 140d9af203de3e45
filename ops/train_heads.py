"""`baton train-heads`: train Medusa heads for a model on its own answers, within a time budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from baton.errors import ConfigError


def train_heads_command(
    model: Annotated[str, typer.Option(
        "--model", "-m", help="'default' (SmolLM2-135M-Instruct), a transformers directory, "
        "a .gguf file, a hub id, or tiny:<arch>")] = "default",
    out: Annotated[Path, typer.Option(help="Directory the heads are saved to")] = Path(
        "medusa-heads"),
    minutes: Annotated[float, typer.Option(
        help="Budget for the whole run: generating the model's answers, training, evaluating")
    ] = 15.0,
    heads: Annotated[int, typer.Option(help="Number of heads (head i drafts i + 2 ahead)")] = 4,
    conditioned: Annotated[bool, typer.Option(
        "--conditioned/--plain", help="Heads that also see the token before the one they draft "
        "(default), or plain Medusa-1 heads")] = True,
    seed: Annotated[int, typer.Option(help="Seed for the data split and training")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all)")] = None,
    output: Annotated[str, typer.Option(help="table or json")] = "table",
) -> None:
    """Train Medusa heads by self-distillation; a worker loads them by path (method `medusa`)."""
    # The training stack (torch, transformers) loads only when this command runs, so the rest of
    # the command line starts fast.
    from baton.ops import heads_training

    if output not in ("table", "json"):
        raise ConfigError(f"--output must be 'table' or 'json', got {output!r}")
    console = Console(stderr=output == "json")
    bars = Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
    gen_task = bars.add_task("generating answers", total=1.0, info="")
    fit_task = bars.add_task("training heads", total=1.0, info="", start=False)

    def on_generate(tokens: int, frac: float) -> None:
        bars.update(gen_task, completed=frac, info=f"{tokens} tokens")

    def on_train(step: int, frac: float, loss: float) -> None:
        if step == 1:
            bars.update(gen_task, completed=1.0)
            bars.start_task(fit_task)
        bars.update(fit_task, completed=frac, info=f"step {step}  loss {loss:.3f}")

    with bars:
        report = heads_training.train_heads(
            model, out, minutes=minutes, num_heads=heads, seed=seed, device=device,
            conditioned=conditioned,
            threads=threads,
            progress=heads_training.Progress(on_generate=on_generate, on_train=on_train),
        )
        bars.update(fit_task, completed=1.0)
    if output == "json":
        typer.echo(json.dumps(report.as_dict()))
        return
    table = Table(title=f"Medusa heads for {report.model}: top-1 agreement on held-out answers")
    table.add_column("head")
    table.add_column("drafts")
    table.add_column("untrained", justify="right")
    table.add_column("trained", justify="right")
    for i, (before, after) in enumerate(zip(report.untrained, report.agreement, strict=True)):
        table.add_row(str(i), f"token +{i + 2}", f"{before:.1%}", f"{after:.1%}")
    console.print(table)
    secs = report.seconds
    console.print(
        f"{report.sequences['train']} answers ({report.positions['train']} tokens) for training, "
        f"{report.sequences['heldout']} held out ({report.positions['evaluated']} positions "
        f"evaluated); {report.steps} steps over {report.softmax_tokens} tokens, drafting "
        f"among {report.draft_tokens}; "
        f"load {secs['load']:.0f}s, generate {secs['generate']:.0f}s, train {secs['train']:.0f}s, "
        f"evaluate {secs['evaluate']:.0f}s"
    )
    console.print(f"[green]saved[/] {report.out_dir} (serve with method medusa, heads path "
                  f"{report.out_dir})")
