"""`baton moefy` end to end: split the dense model, save the checkpoint, measure the cost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from baton.actors.pregate import install
from baton.ops.moefy import (
    MoefyOptions,
    check_out_dir,
    load_dense,
    moefy,
    save,
    text_chunks,
    trace_mlps,
)
from baton.ops.moefy_eval import (
    MoefyReport,
    agreement,
    greedy,
    greedy_prompts,
    router_recall,
    score,
)

REPORT_FILE = "moefy_report.json"


def run_moefy(spec: str, out: Path, options: MoefyOptions,
              threads: int | None = None) -> MoefyReport:
    """Write the moefied `spec` to `out` with `moefy_report.json` beside it, and return the
    report. Raises before any work if `out` is not empty or the model cannot be split;
    `threads` sets torch's CPU threads."""
    check_out_dir(out)
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.monotonic()
    dense = load_dense(spec)
    load_s = time.monotonic() - start
    result = moefy(dense, options)
    start = time.monotonic()
    save(result, out)
    if result.split.pregate is not None:  # measured as Baton serves it: routed by the pre-gate
        install(result.moe, result.split.pregate)
    seconds = {"load": load_s, **result.seconds, "save": time.monotonic() - start}

    start = time.monotonic()
    heldout = text_chunks(dense, heldout=True, options=options)
    want = score(dense.model, heldout)
    got = score(result.moe, heldout)
    prompts = greedy_prompts(dense.tokenizer)
    prefix, position = agreement(greedy(dense.model, prompts, options.greedy_tokens),
                                 greedy(result.moe, prompts, options.greedy_tokens))
    routed, oracle = router_recall(dense.model, trace_mlps(dense.model, heldout), result.split,
                                   options.top_k)
    seconds["evaluate"] = time.monotonic() - start
    report = MoefyReport(
        model=dense.name,
        out_dir=str(out),
        experts=options.experts,
        top_k=options.top_k,
        pregate=options.pregate,
        expert_size=result.moe.config.intermediate_size,
        calibration_tokens=result.calibration_tokens,
        heldout_tokens=want.tokens,
        dense_perplexity=want.perplexity,
        moe_perplexity=got.perplexity,
        top1_agreement=(want.top1 == got.top1).float().mean().item(),
        greedy_prompts=len(prompts),
        greedy_tokens=options.greedy_tokens,
        greedy_prefix_agreement=prefix,
        greedy_position_agreement=position,
        router_recall=sum(routed) / len(routed),
        oracle_recall=sum(oracle) / len(oracle),
        random_recall=options.top_k / options.experts,
        router_recall_per_layer=routed,
        seconds=seconds,
    )
    (out / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report
