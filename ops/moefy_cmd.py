"""`baton moefy`: turn a dense model into a Mixture-of-Experts checkpoint and report its cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from baton.ops.moefy_eval import MoefyReport


def moefy_command(
    out: Annotated[Path, typer.Option(help="New (or empty) directory for the checkpoint")],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="A dense Llama-style model: 'default' (SmolLM2-135M-Instruct), "
        "a transformers directory, a hub id, or tiny:llama")] = "default",
    experts: Annotated[int, typer.Option(
        help="Experts per layer (must divide the intermediate size)")] = 16,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts each token runs")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for the neuron clustering")] = 0,
    pregate: Annotated[bool, typer.Option(
        "--pregate", help="Route every layer by one router on the first layer's input (Read-ME "
        "pre-gating): a forward's experts are known before its first MoE layer runs, so offload "
        "can load them all ahead (policy 'pregate')")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Split each MLP into experts by co-activation, fit routers, write a Mixtral checkpoint."""
    # torch and transformers load only when this command runs, so the rest of the command line
    # starts fast.
    from baton.ops.moefy import MoefyOptions
    from baton.ops.moefy_run import REPORT_FILE, run_moefy

    options = MoefyOptions(experts=experts, top_k=top_k, seed=seed, pregate=pregate)
    console = Console(stderr=as_json)
    with console.status(f"moefying {model} into {experts} experts, top-{top_k}"):
        report = run_moefy(model, out, options, threads=threads)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
        return
    show(report, console, REPORT_FILE)


def show(report: MoefyReport, console: Console, report_file: str) -> None:
    """The report as a table: dense against moefied, on held-out text."""
    routing = ", one pre-gate for all layers" if report.pregate else ""
    table = Table(title=f"{report.model} as {report.experts} experts of {report.expert_size} "
                  f"neurons, top-{report.top_k}{routing} (held-out text, "
                  f"{report.heldout_tokens} tokens)")
    table.add_column("measure")
    table.add_column("dense", justify="right")
    table.add_column("moefied", justify="right")
    table.add_row("perplexity", f"{report.dense_perplexity:.2f}", f"{report.moe_perplexity:.2f}")
    table.add_row("next-token top-1 agreement", "", f"{report.top1_agreement:.1%}")
    table.add_row(f"greedy prefix agreement ({report.greedy_prompts} x {report.greedy_tokens})",
                  "", f"{report.greedy_prefix_agreement:.1%}")
    table.add_row("greedy position agreement", "", f"{report.greedy_position_agreement:.1%}")
    table.add_row("router recall (oracle / random)", "",
                  f"{report.router_recall:.1%} ({report.oracle_recall:.1%} / "
                  f"{report.random_recall:.1%})")
    console.print(table)
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    console.print(f"{report.calibration_tokens} calibration tokens; {secs}")
    console.print(f"[green]saved[/] {report.out_dir} (report: {report_file}); serve it with "
                  f"--model {report.out_dir}")
