"""Baton's CPU decode attention (`cpu_decode.decode_attention`) in `baton bench kernels`.

The default model's shapes (9 query and 3 kv heads, head dim 64), bf16, at 150, 600 and 1,500
keys: one decode token, verify runs of 8 and 16 tokens (chains, each token seeing the draft
before it), a draft tree of 8 tokens (two branches from the root), and 16 sequences of one token
each. Each case is 30 calls (a step's layers) on scattered paged blocks, the median of 15
repeats, against torch's `scaled_dot_product_attention` on the same keys and values laid out
contiguously beforehand (the layout a paged kernel has to make up for; the gather is not timed).
Where the CPU has AMX, the AVX-512 kernel is timed beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from baton.kernels import cpu_decode

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
LAYERS = 30
KEYS = (150, 600, 1500)
CASES = (("1 token", 1, 1), ("8-token run", 1, 8), ("16-token run", 1, 16),
         ("8-token tree", 1, 8), ("16 sequences x 1 token", 16, 1))
# The tree's slots after the root: two branches, slots 1-3 and 4-7, each a chain from the root.
TREE_BITS = [1] + [1 | sum(1 << j for j in range(1, s + 1)) for s in range(1, 4)] + [
    1 | sum(1 << j for j in range(4, s + 1)) for s in range(4, 8)]


def _median_ms(fn: Callable[[], Any], repeats: int = 15) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(LAYERS):
            fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _case(keys: int, seqs: int, run: int, tree: bool, gen: torch.Generator,
          amx: bool) -> dict[str, Any]:
    per_seq = (keys + run) // BLOCK + 1
    blocks = seqs * per_seq + 1
    k = torch.randn(KV_HEADS, blocks, BLOCK, HEAD_DIM, generator=gen).to(torch.bfloat16)
    v = torch.randn(KV_HEADS, blocks, BLOCK, HEAD_DIM, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(blocks, generator=gen)[:seqs * per_seq].view(seqs, per_seq)
    tokens = seqs * run
    q = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    rows = torch.arange(seqs).repeat_interleave(run)
    base = torch.full((tokens,), keys)
    chain = [(1 << (i + 1)) - 1 if run > 1 else 0 for i in range(run)]
    bits = torch.tensor((TREE_BITS if tree else chain) * seqs)
    scale = HEAD_DIM ** -0.5

    def kernel(use_amx: bool) -> Callable[[], Any]:
        return lambda: cpu_decode.decode_attention(q, k, v, tables, rows, base, bits, scale,
                                                   amx=use_amx)

    # The same keys and values contiguous, [seqs, kv heads, keys + run, D], queries by sequence.
    ctx = keys + run
    slots = (tables[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten(1)[:, :ctx]
    kc = k.flatten(1, 2)[:, slots].permute(1, 0, 2, 3).contiguous()
    vc = v.flatten(1, 2)[:, slots].permute(1, 0, 2, 3).contiguous()
    qs = q.view(seqs, run, HEADS, HEAD_DIM).transpose(1, 2)
    mask = torch.ones(run, ctx, dtype=torch.bool)
    mask[:, keys:] = ((bits[:run, None] >> torch.arange(run)) & 1).bool()

    def sdpa() -> Any:
        return F.scaled_dot_product_attention(qs, kc, vc, attn_mask=mask, scale=scale,
                                              enable_gqa=True)

    row = {"keys": keys, "sequences": seqs, "run": run, "kernel_ms": _median_ms(kernel(amx)),
           "sdpa_ms": _median_ms(sdpa)}
    if amx:
        row["avx512_ms"] = _median_ms(kernel(False))
    return row


def run(progress: Console) -> dict[str, Any]:
    """The CPU attention report, or why nothing was measured."""
    if cpu_decode.kernel() is None:
        return {"status": "skipped", "reason": "Baton's CPU kernels are not on this machine"}
    amx = cpu_decode.attention_on_amx(HEAD_DIM)
    gen = torch.Generator().manual_seed(0)
    cases = []
    with torch.inference_mode():
        for keys in KEYS:
            progress.log(f"timing CPU decode attention at {keys} keys")
            for name, seqs, run_len in CASES:
                cases.append({"case": name,
                              **_case(keys, seqs, run_len, "tree" in name, gen, amx)})
    return {"status": "ok", "kernel": "amx" if amx else "avx512",
            "threads": torch.get_num_threads(), "layers": LAYERS, "cases": cases}


def show(report: dict[str, Any], console: Console) -> None:
    if report["status"] != "ok":
        console.print(f"CPU decode attention: skipped ({report['reason']})")
        return
    table = Table(title=f"CPU decode attention ({report['kernel']}), ms for {report['layers']} "
                        f"calls, {report['threads']} threads")
    cols = ["keys", "case", "kernel ms", "sdpa ms", "vs sdpa", "per token vs 1 token"]
    if any("avx512_ms" in c for c in report["cases"]):
        cols.append("AVX-512 ms")
    for col in cols:
        table.add_column(col)
    single = {c["keys"]: c["kernel_ms"] for c in report["cases"] if c["case"] == "1 token"}
    for c in report["cases"]:
        tokens = c["sequences"] * c["run"]
        cells = [str(c["keys"]), c["case"], f"{c['kernel_ms']:.2f}", f"{c['sdpa_ms']:.2f}",
                 f"{c['sdpa_ms'] / c['kernel_ms']:.1f}x",
                 f"{c['kernel_ms'] / tokens / single[c['keys']]:.2f}"]
        if "avx512_ms" in c:
            cells.append(f"{c['avx512_ms']:.2f}")
        table.add_row(*cells)
    console.print(table)
