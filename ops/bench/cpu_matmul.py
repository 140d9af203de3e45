"""Baton's skinny CPU matmul (`cpu_decode.skinny_linear`) in `baton bench kernels`.

The default model's shapes, bf16, at 1, 4, 8, 16 and 32 token rows (a decode step, verify steps,
small batches): its 30 layers' projections (q+k+v 960 x 576, o 576 x 576, gate+up 3072 x 576,
down 576 x 1536: 212 MB, far past the caches, so each pass reads them from memory) and the LM
head (49152 x 576, with 128 MB written between calls so that it is cold as a step meets it).
Random weights; against oneDNN on its own packed copy of the same weights
(`torch.ops.mkldnn._linear_pointwise`, what `PackedLinear` runs), the two alternated, medians.
The row columns tell what a verify step's extra rows cost: on AVX-512 the lanes layout takes eight
rows a pass for about the reads of one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from baton.kernels import cpu_decode

LAYERS = 30
PROJECTIONS = ((960, 576), (576, 576), (3072, 576), (576, 1536))
HEAD = (49152, 576)
ROWS = (1, 4, 8, 16, 32)


def _alternated_ms(fns: dict[str, Callable[[], Any]], repeats: int,
                   before: Callable[[], Any] | None = None) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _weights(shape: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    return cpu_decode.pack_skinny(w), torch.ops.mkldnn._reorder_linear_weight(w, 1)


def run(progress: Console) -> dict[str, Any]:
    """The skinny matmul report, or why nothing was measured."""
    if cpu_decode.kernel() is None:
        return {"status": "skipped", "reason": "Baton's CPU kernels are not on this machine"}
    gen = torch.Generator().manual_seed(0)
    progress.log("timing the CPU skinny matmul against oneDNN")
    layers = [[_weights(shape, gen) for shape in PROJECTIONS] for _ in range(LAYERS)]
    head = _weights(HEAD, gen)
    flush = torch.ones(32 * 1024 * 1024)  # 128 MB
    cases = []
    with torch.inference_mode():
        for rows in ROWS:
            x = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in (576, 1536)}

            def projections(skinny: bool, x=x) -> None:
                for layer in layers:
                    for (n, k), (packed, onednn) in zip(PROJECTIONS, layer, strict=True):
                        if skinny:
                            cpu_decode.skinny_linear(x[k], packed, n)
                        else:
                            torch.ops.mkldnn._linear_pointwise(x[k], onednn, None, "none", [],
                                                               "")

            def lm_head(skinny: bool, x=x[576]) -> None:
                if skinny:
                    cpu_decode.skinny_linear(x, head[0], HEAD[0])
                else:
                    torch.ops.mkldnn._linear_pointwise(x, head[1], None, "none", [], "")

            layers_ms = _alternated_ms({"kernel": lambda: projections(True),
                                        "onednn": lambda: projections(False)}, 9)
            head_ms = _alternated_ms({"kernel": lambda: lm_head(True),
                                      "onednn": lambda: lm_head(False)}, 15,
                                     before=lambda: flush.add_(1.0))
            cases.append({"rows": rows, "projections_ms": layers_ms["kernel"],
                          "projections_onednn_ms": layers_ms["onednn"],
                          "lm_head_ms": head_ms["kernel"], "lm_head_onednn_ms": head_ms["onednn"]})
    return {"status": "ok", "kernel": "amx" if cpu_decode.amx_rows() else "avx512",
            "threads": torch.get_num_threads(), "cases": cases}


def show(report: dict[str, Any], console: Console) -> None:
    if report["status"] != "ok":
        console.print(f"CPU skinny matmul: skipped ({report['reason']})")
        return
    table = Table(title=f"CPU skinny matmul ({report['kernel']}), the default model's "
                        f"{LAYERS} layers' projections and LM head, ms, "
                        f"{report['threads']} threads")
    for col in ("rows", "projections", "oneDNN", "vs 1 row", "LM head", "oneDNN",
                "vs 1 row"):
        table.add_column(col)
    one = report["cases"][0]
    for c in report["cases"]:
        table.add_row(str(c["rows"]), f"{c['projections_ms']:.2f}",
                      f"{c['projections_onednn_ms']:.2f}",
                      f"{c['projections_ms'] / one['projections_ms']:.2f}x",
                      f"{c['lm_head_ms']:.2f}", f"{c['lm_head_onednn_ms']:.2f}",
                      f"{c['lm_head_ms'] / one['lm_head_ms']:.2f}x")
    console.print(table)
