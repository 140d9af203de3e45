"""`baton bench engine`: Baton's engine against transformers on one workload, in one run.

Systems, all on the same token-id prompts, output lengths (EOS ignored), model, dtype and threads:
transformers `generate` one request at a time, transformers static batching (one left-padded
batch), transformers continuous batching (the `generate_batch` machinery), and Baton's engine
under a closed-loop client at concurrency 1, 4 and 16, plus, for each weight-only quantization
asked for (`quantizations`), Baton single-stream on quantized weights, so int8 / int4 against the
unquantized dtype come from one run. A memory-bandwidth roofline puts the single-stream decode
speed in context. Ratios, not absolute figures, are what to quote: these
machines are shared and noisy.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from baton.actors.engine import DTYPES, Engine
from baton.actors.model_source import resolve
from baton.engine_config import QUANTIZATIONS
from baton.errors import ConfigError
from baton.ops.bench import llama_cpp_peer
from baton.ops.bench.hf_baselines import (
    load_hf,
    run_hf_generate,
    run_hf_generate_batch,
    run_hf_static_batch,
    warm_hf,
)
from baton.ops.bench.machine import OtherCPUBusy, machine_info, warn_if_busy
from baton.ops.bench.report import ms, run_and_report
from baton.ops.bench.workload import (
    MAX_OUTPUT_TOKENS,
    RequestTiming,
    SystemResult,
    Workload,
    build_workload,
)
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 16)
BANDWIDTH_BYTES = 1 << 30


# -- Baton ----------------------------------------------------------------------------------------


def run_baton(model: str, dtype: str, threads: int, wl: Workload, concurrency: int,
              quantization: str | None = None) -> SystemResult:
    """A fresh engine (no prefix cache carried over between runs) under a closed-loop client.

    The client keeps `concurrency` requests in flight, submitting the next prompt as one finishes.
    """
    engine = Engine(model=model, dtype=dtype, num_threads=threads, quantization=quantization)
    # Warm on a prompt not in the workload, so it seeds no prefix-cache hits.
    engine.generate([wl.requests[0].prompt_ids[:16][::-1]],
                    SamplingParams(max_tokens=4, ignore_eos=True))
    result = _closed_loop(engine, wl, concurrency)
    result.notes["quantization"] = engine.config.quantization
    del engine
    gc.collect()
    return result


def _closed_loop(engine: Engine, wl: Workload, concurrency: int) -> SystemResult:
    waiting = deque(wl.requests)
    in_flight: dict[str, int] = {}
    timings: list[RequestTiming] = []
    cached = 0

    def submit() -> None:
        req = waiting.popleft()
        rid = engine.add_request(list(req.prompt_ids),
                                 SamplingParams(max_tokens=req.max_tokens, ignore_eos=True))
        in_flight[rid] = req.max_tokens

    t0 = time.perf_counter()
    for _ in range(min(concurrency, len(waiting))):
        submit()
    while in_flight:
        if not engine.has_unfinished():
            raise RuntimeError(f"engine went idle with {len(in_flight)} requests unanswered")
        for out in engine.step():
            if not out.finished:
                continue
            wanted = in_flight.pop(out.request_id)
            n = len(out.token_ids)
            if out.finish_reason != "length" or n != wanted:
                raise RuntimeError(f"request {out.request_id} ended with {out.finish_reason!r} "
                                   f"after {n} of {wanted} tokens ({out.error})")
            m = out.metrics
            cached += m.num_cached_tokens
            timings.append(RequestTiming(m.ttft or 0.0, m.tpot(n), n))
            if waiting:
                submit()
    wall = time.perf_counter() - t0
    return SystemResult(timings, wall, {"concurrency": concurrency,
                                        "cached_prompt_tokens": cached})


# -- roofline -------------------------------------------------------------------------------------


def read_bandwidth_gbps(nbytes: int = BANDWIDTH_BYTES, repeats: int = 7) -> float:
    """Best-of-`repeats` memory read bandwidth (GB/s) of `torch.sum` over a float32 tensor."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)  # written once, so every page is mapped
    torch.sum(x)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.sum(x)
        best = min(best, time.perf_counter() - t0)
    del x
    return nbytes / best / 1e9


def bytes_per_decode_token(model) -> int:
    """Weight bytes one decode step reads: every parameter once, the embedding as a single row.

    A tied lm_head reads the embedding matrix in full, so then that matrix counts once, whole.
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied params once
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not emb:
        total -= emb.numel() * emb.element_size() - emb[0].numel() * emb.element_size()
    return total


def _measure(name: str, fn: Callable[[], SystemResult], say: Callable[[str], Any]) -> SystemResult:
    """Run one system, noting the share of the CPU other processes (or the hypervisor) took."""
    say(f"running {name}")
    others = OtherCPUBusy()
    result = fn()
    other = others.share()
    result.notes["other_cpu_busy"] = other
    say(f"  {result.wall_s:.0f} s" + ("" if other is None else f", others used {other:.0%} of CPU"))
    return result


# -- report ---------------------------------------------------------------------------------------


def run(*, model: str = "default", num_prompts: int = 16, dtype: str = "bfloat16",
        threads: int | None = None, seed: int = 0, max_output_tokens: int = MAX_OUTPUT_TOKENS,
        quantizations: tuple[str, ...] = (), progress: Console | None = None) -> dict[str, Any]:
    """Run every system over one workload and return the JSON report."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    bad = sorted(set(quantizations) - set(QUANTIZATIONS))
    if bad:
        raise ConfigError(f"--quantization must be one of {list(QUANTIZATIONS)}, got {bad}")
    if num_prompts < 1 or (threads is not None and threads < 1):
        raise ConfigError("--num-prompts and --threads must be >= 1")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    say = progress.print if progress else log.info
    source = resolve(model)
    say(f"loading {source.name} for transformers ({dtype}, threads={threads})")
    hf_model, tokenizer = load_hf(source, DTYPES[dtype])
    limit = getattr(hf_model.config.get_text_config(), "max_position_embeddings", 4096) or 4096
    wl = build_workload(tokenizer, num_prompts, seed, limit, max_output_tokens)
    say(f"workload: {len(wl.requests)} prompts, {wl.total_output_tokens} output tokens")
    gguf = llama_cpp_peer.gguf_file(source)
    peer = llama_cpp_peer.status(gguf)
    say(f"llama.cpp peer: {peer}")
    bytes_per_token = bytes_per_decode_token(hf_model)
    say("measuring memory read bandwidth")
    bandwidth = read_bandwidth_gbps()
    systems: dict[str, SystemResult] = {}
    warm_hf(hf_model, wl)
    for name, fn in (("hf_generate", run_hf_generate), ("hf_static_batch", run_hf_static_batch),
                     ("hf_generate_batch", run_hf_generate_batch)):
        systems[name] = _measure(name, partial(fn, hf_model, wl), say)
    del hf_model  # free the baseline's weights before Baton loads its own
    gc.collect()
    for c in CONCURRENCY:
        run_c = partial(run_baton, model, dtype, threads, wl, c)
        systems[f"baton_c{c}"] = _measure(f"baton_c{c}", run_c, say)
        if c == 1:  # quantized single streams and the peer next to Baton's: the least drift
            for q in quantizations:
                run_q = partial(run_baton, model, dtype, threads, wl, 1, q)
                systems[f"baton_{q}_c1"] = _measure(f"baton_{q}_c1", run_q, say)
            if gguf is not None and peer == llama_cpp_peer.RUNS:
                run_peer = partial(llama_cpp_peer.run_llama_cpp, gguf, threads, wl, limit)
                systems[llama_cpp_peer.NAME] = _measure(llama_cpp_peer.NAME, run_peer, say)
    summary = {name: res.summary() for name, res in systems.items()}
    roofline_tok_s = bandwidth * 1e9 / bytes_per_token
    c1_tpot = summary["baton_c1"]["tpot_p50_s"]
    c1_decode = 1 / c1_tpot if c1_tpot else None

    def ratio(a: str, b: str) -> float:
        return summary[a]["output_tok_s"] / summary[b]["output_tok_s"]

    return {
        "machine": machine_info(threads, ["transformers"]),
        "model": source.name,
        "dtype": dtype,
        "workload": wl.describe(),
        "systems": summary,
        "roofline": {
            "read_bandwidth_gbps": bandwidth,
            "bytes_per_token": bytes_per_token,
            "roofline_tok_s": roofline_tok_s,
            "baton_c1_decode_tok_s": c1_decode,
            "note": "weights only (KV cache reads not counted); bandwidth: best torch.sum over "
                    f"{BANDWIDTH_BYTES >> 20} MiB float32",
        },
        "ratios": {
            "single_stream_vs_hf_generate": ratio("baton_c1", "hf_generate"),
            "c16_vs_hf_static_batch": ratio("baton_c16", "hf_static_batch"),
            "c16_vs_hf_generate_batch": ratio("baton_c16", "hf_generate_batch"),
            **{f"{q}_single_stream_vs_{dtype}": ratio(f"baton_{q}_c1", "baton_c1")
               for q in quantizations},
            **({"single_stream_vs_llama_cpp": ratio("baton_c1", llama_cpp_peer.NAME),
                **{f"{q}_single_stream_vs_llama_cpp": ratio(f"baton_{q}_c1", llama_cpp_peer.NAME)
                   for q in quantizations}}
               if llama_cpp_peer.NAME in summary else {}),
        },
        "peers": {"llama_cpp": {
            "status": peer, "gguf": None if gguf is None else gguf.name,
            "quantization": None if gguf is None else llama_cpp_peer.quantization(gguf)}},
        "roofline_fraction_bs1": c1_decode / roofline_tok_s if c1_decode else None,
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"baton bench engine: {report['model']} {report['dtype']}, "
                        f"{report['machine']['threads']} threads", caption="TTFT, TPOT in ms")
    table.add_column("system", no_wrap=True)
    for col in ("tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "wall s"):
        table.add_column(col, justify="right")
    for name, s in report["systems"].items():
        table.add_row(name, f"{s['output_tok_s']:.1f}", ms(s["ttft_p50_s"]), ms(s["ttft_p99_s"]),
                      ms(s["tpot_p50_s"]), ms(s["tpot_p99_s"]), f"{s['wall_s']:.1f}")
    console.print(table)
    warn_if_busy(console, {n: s["other_cpu_busy"] for n, s in report["systems"].items()},
                 "those figures are skewed; rerun on a quiet machine")
    for name, value in report["ratios"].items():
        console.print(f"{name}: {value:.2f}x")
    peer = report["peers"]["llama_cpp"]
    console.print(f"llama.cpp peer: {peer['status']}"
                  + (f" ({peer['gguf']}, {peer['quantization']})" if peer["gguf"] else ""))
    roof = report["roofline"]
    frac = report["roofline_fraction_bs1"]
    console.print(f"roofline: {roof['read_bandwidth_gbps']:.1f} GB/s / "
                  f"{roof['bytes_per_token'] / 1e6:.1f} MB per token = "
                  f"{roof['roofline_tok_s']:.1f} tok/s; baton_c1 decode reaches "
                  + ("-" if frac is None else f"{frac:.1%}"))


def main(*, json_path: str | None = None, model: str = "default", num_prompts: int = 16,
         dtype: str = "bfloat16", threads: int | None = None, seed: int = 0,
         max_output_tokens: int = MAX_OUTPUT_TOKENS, quantizations: tuple[str, ...] = ()
         ) -> dict[str, Any]:
    """Run the benchmark, write the JSON report to `json_path` (if given), print a table."""
    return run_and_report(
        lambda progress: run(model=model, num_prompts=num_prompts, dtype=dtype, threads=threads,
                             seed=seed, max_output_tokens=max_output_tokens,
                             quantizations=quantizations, progress=progress),
        print_report, json_path)
