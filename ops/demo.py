"""`make demo`: requests over gRPC to a running cluster, streamed side by side, then a summary.

One long prompt (prefilled on the prefill worker, its KV pushed to the decode worker) and short
ones (prefilled where they decode), all at once. Each request has its own panel that fills as its
tokens arrive; then per request: the path it took, TTFT, TPOT and KV bytes moved.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from baton.client import AsyncBatonClient
from baton.cluster.local_record import LocalCluster
from baton.errors import BatonError
from baton.ops.bench.workload import PARAGRAPHS
from baton.stats import tpot

SHORT = ["Name three primary colors.", "Write a haiku about the sea.", "What is 12 times 12?"]
MAX_TOKENS = 64
REFRESH_PER_S = 8


def long_prompt() -> str:
    notes = "\n\n".join(PARAGRAPHS)
    return f"Read these notes, then answer.\n\n{notes}\n\nWhich of the notes is about bread?"


@dataclass(slots=True)
class Trace:
    label: str
    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    path: str = ""
    kv_bytes: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None  # why the request failed, said by the cluster
    text: list[str] = field(default_factory=list)


def panel(t: Trace) -> Panel:
    """One request's stream so far: its text, titled with its name and where it stands."""
    state = "failed" if t.error else t.finish_reason or ("streaming" if t.tokens else "waiting")
    title = f"[bold]{t.label}[/] [dim]{t.path or '…'}[/]"
    subtitle = f"{t.tokens}/{MAX_TOKENS} tok · {state}"
    body = Text("".join(t.text))
    if t.error:
        body.append(f"\n{t.error}", style="bold red")
    border = "red" if t.error else "green" if t.finish_reason else "cyan"
    return Panel(body, title=title, subtitle=subtitle, border_style=border)


def board(traces: list[Trace]) -> Table:
    """Every request's panel side by side, in one row of equal columns."""
    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in traces:
        grid.add_column(ratio=1)
    grid.add_row(*(panel(t) for t in traces))
    return grid


async def _one(client: AsyncBatonClient, t: Trace, prompt: str) -> None:
    try:
        await _stream(client, t, prompt)
    except BatonError as exc:  # shown in the request's panel; the other streams go on
        t.error = str(exc)


async def _stream(client: AsyncBatonClient, t: Trace, prompt: str) -> None:
    messages = [{"role": "user", "content": prompt}]
    async for chunk in client.generate(messages, max_tokens=MAX_TOKENS, temperature=0.0):
        now = time.perf_counter()
        if chunk.path:
            t.path = chunk.path
        if chunk.token_ids:
            t.first = t.first or now
            t.last = now
            t.tokens += len(chunk.token_ids)
        t.text.append(chunk.text)
        if chunk.finish_reason:
            t.finish_reason = chunk.finish_reason
            t.kv_bytes, t.prompt_tokens = chunk.kv_bytes, chunk.prompt_tokens


async def run(console: Console) -> list[Trace]:
    cluster = LocalCluster.load()
    jobs = [("long", long_prompt())] + [(f"short{i}", p) for i, p in enumerate(SHORT)]
    now = time.perf_counter()
    traces = [Trace(label, now) for label, _ in jobs]
    async with AsyncBatonClient(cluster.grpc_address, token=cluster.token) as client:
        with Live(board(traces), console=console, refresh_per_second=REFRESH_PER_S) as live:
            streams = asyncio.gather(*(_one(client, t, p)
                                       for t, (_, p) in zip(traces, jobs, strict=True)))
            while not streams.done():
                live.update(board(traces))
                await asyncio.wait([streams], timeout=1 / REFRESH_PER_S)
            live.update(board(traces))
            await streams  # anything but a request's own failure ends the demo here
    return traces


def summary(traces: list[Trace]) -> Table:
    table = Table(title="Baton demo")
    for col in ("request", "path", "prompt tok", "output tok", "TTFT ms", "TPOT ms", "KV moved"):
        table.add_column(col)
    for t in traces:
        ttft = "-" if t.first is None else f"{(t.first - t.sent) * 1000:.0f}"
        per_token = tpot(t.first, t.last, t.tokens)
        table.add_row(t.label, "failed" if t.error else t.path, str(t.prompt_tokens),
                      str(t.tokens), ttft,
                      "-" if per_token is None else f"{per_token * 1000:.1f}",
                      f"{t.kv_bytes / 2**20:.2f} MiB")
    return table


def main() -> None:
    console = Console()
    traces = asyncio.run(run(console))
    console.print(summary(traces))
    failed = [t.label for t in traces if t.error]
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/] (see their panels above)")
        sys.exit(1)


if __name__ == "__main__":
    main()
