"""`make demo`: requests over gRPC to a running cluster, streamed to the terminal, then a summary.

One long prompt (prefilled on the prefill worker, its KV pushed to the decode worker) and short
ones (prefilled where they decode), all at once, each streamed as it comes; then per request: the
path it took, TTFT, TPOT and KV bytes moved.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from baton.client import AsyncBatonClient
from baton.cluster.local import LocalCluster
from baton.ops.bench.workload import PARAGRAPHS
from baton.stats import tpot

SHORT = ["Name three primary colors.", "Write a haiku about the sea.", "What is 12 times 12?"]


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
    text: list[str] = field(default_factory=list)


async def _one(client: AsyncBatonClient, label: str, prompt: str, console: Console) -> Trace:
    t = Trace(label, time.perf_counter())
    messages = [{"role": "user", "content": prompt}]
    async for chunk in client.generate(messages, max_tokens=64, temperature=0.0):
        now = time.perf_counter()
        if chunk.path:
            t.path = chunk.path
        if chunk.token_ids:
            t.first = t.first or now
            t.last = now
            t.tokens += len(chunk.token_ids)
        t.text.append(chunk.text)
        if chunk.text:
            console.print(f"[dim]{label}[/] {chunk.text!r}", highlight=False)
        if chunk.finish_reason:
            t.kv_bytes, t.prompt_tokens = chunk.kv_bytes, chunk.prompt_tokens
    return t


async def run(console: Console) -> list[Trace]:
    cluster = LocalCluster.load()
    async with AsyncBatonClient(cluster.grpc_address, token=cluster.token) as client:
        jobs = [("long", long_prompt())] + [(f"short{i}", p) for i, p in enumerate(SHORT)]
        return list(await asyncio.gather(*(_one(client, label, p, console)
                                           for label, p in jobs)))


def summary(traces: list[Trace], console: Console) -> None:
    table = Table(title="Baton demo")
    for col in ("request", "path", "prompt tok", "output tok", "TTFT ms", "TPOT ms", "KV moved"):
        table.add_column(col)
    for t in traces:
        ttft = (t.first - t.sent) * 1000 if t.first else float("nan")
        per_token = tpot(t.first, t.last, t.tokens)
        table.add_row(t.label, t.path, str(t.prompt_tokens), str(t.tokens), f"{ttft:.0f}",
                      "-" if per_token is None else f"{per_token * 1000:.1f}",
                      f"{t.kv_bytes / 2**20:.2f} MiB")
    console.print(table)
    for t in traces:
        console.print(f"[bold]{t.label}[/]: {''.join(t.text).strip()}")


def main() -> None:
    console = Console()
    traces = asyncio.run(run(console))
    summary(traces, console)


if __name__ == "__main__":
    main()
