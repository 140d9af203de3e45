"""`baton bench engine`: Baton's engine against transformers on one workload, in one run.

Systems, all on the same token-id prompts, output lengths (EOS ignored), model, dtype and threads:
transformers `generate` one request at a time, transformers static batching (one left-padded
batch), transformers continuous batching (the `generate_batch` machinery), and Baton's engine
under a closed-loop client at concurrency 1, 4 and 16. A memory-bandwidth roofline puts the
single-stream decode speed in context. Ratios, not absolute figures, are what to quote: these
machines are shared and noisy.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import platform
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers.generation.streamers import BaseStreamer

from baton.actors.engine import Engine
from baton.actors.model_source import ModelSource, resolve
from baton.errors import ConfigError
from baton.ops.bench.workload import (
    RequestTiming,
    SystemResult,
    Workload,
    build_workload,
    cpu_seconds,
)
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 16)
BANDWIDTH_BYTES = 1 << 30
NOISY = 0.15  # other processes' share of the CPU above which a result is flagged
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class StepClock(BaseStreamer):
    """Streamer noting when `generate` hands out each step's tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def steps(self) -> list[float]:  # the first put is the prompt
        return self.times[1:]


# -- transformers baselines -----------------------------------------------------------------------


def load_hf(source: ModelSource, dtype: torch.dtype):
    """(model, tokenizer) from the very source Baton's engine loads, with SDPA attention."""
    if source.kind == "tiny":
        from baton.actors.tiny import tiny_model, tiny_tokenizer

        return tiny_model(source.spec.split(":", 1)[1], dtype, "sdpa"), tiny_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.eval(), tokenizer


def _pad_id(model) -> int:
    cfg = model.generation_config
    value = next((v for v in (cfg.pad_token_id, cfg.eos_token_id) if v is not None), 0)
    return value[0] if isinstance(value, list) else value


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, n: int, clock: StepClock | None):
    # min_new_tokens == max_new_tokens: EOS is masked out, every row gets exactly n tokens.
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=_pad_id(model),
                              streamer=clock)


def warm_hf(model, wl: Workload) -> None:
    ids = torch.tensor([wl.requests[0].prompt_ids[:16]])
    _generate(model, ids, torch.ones_like(ids), 4, None)


def run_hf_generate(model, wl: Workload) -> SystemResult:
    """transformers `generate`, one request after another (batch 1)."""
    timings = []
    start = time.perf_counter()
    for req in wl.requests:
        ids = torch.tensor([req.prompt_ids])
        clock = StepClock()
        t0 = time.perf_counter()
        out = _generate(model, ids, torch.ones_like(ids), req.max_tokens, clock)
        n = out.shape[1] - ids.shape[1]
        timings.append(RequestTiming(clock.steps[0] - t0, _tpot(clock.steps[:n]), n))
    return SystemResult(timings, time.perf_counter() - start)


def run_hf_static_batch(model, wl: Workload) -> SystemResult:
    """transformers `generate` on all requests at once: one left-padded batch run to the longest."""
    width = max(len(r.prompt_ids) for r in wl.requests)
    ids = torch.full((len(wl.requests), width), _pad_id(model), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, req in enumerate(wl.requests):
        ids[i, width - len(req.prompt_ids):] = torch.tensor(req.prompt_ids)
        mask[i, width - len(req.prompt_ids):] = 1
    longest = wl.max_output_tokens
    clock = StepClock()
    t0 = time.perf_counter()
    out = _generate(model, ids, mask, longest, clock)
    wall = time.perf_counter() - t0
    steps = clock.steps
    # A request's tokens are ready at its own step n; later steps for its row are wasted work.
    timings = [RequestTiming(steps[0] - t0, _tpot(steps[: r.max_tokens]), r.max_tokens)
               for r in wl.requests]
    return SystemResult(timings, wall, {
        "batch_size": len(wl.requests),
        "max_new_tokens": longest,
        "generated_tokens": (out.shape[1] - width) * len(wl.requests),
        "tokens_counted": "each request's own max_tokens only; a row's steps past its length "
                          "are generated but not counted in output_tok_s",
        "ttft_is": "time to the batch's first generated step (the same for every request)",
    })


def run_hf_generate_batch(model, wl: Workload) -> SystemResult:
    """transformers continuous batching: `generate_batch`'s own manager and loop.

    `generate_batch` gives every request the same max_new_tokens; its manager takes one per
    request, so this drives the manager as `generate_batch` does (same workload hints, warmup
    before the clock starts) with each request's own length and EOS off.
    """
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gen_cfg = GenerationConfig(max_new_tokens=wl.max_output_tokens, do_sample=False,
                               eos_token_id=-1, pad_token_id=_pad_id(model))
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_ids) for r in wl.requests),
                          max_generated_length=wl.max_output_tokens,
                          num_requests=len(wl.requests))
    with model.continuous_batching_context_manager(
        generation_config=gen_cfg, block=True, timeout=5, workload_hints=hints
    ) as manager:
        t0 = time.perf_counter()
        for i, req in enumerate(wl.requests):
            manager.add_request(req.prompt_ids, request_id=f"r{i}", max_new_tokens=req.max_tokens,
                                record_timestamps=True, eos_token_id=-1)
        results = {}
        while len(results) < len(wl.requests):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped early")
                continue
            if res.error is not None:
                raise RuntimeError(f"generate_batch request {res.request_id} failed: {res.error}")
            if res.is_finished():
                results[res.request_id] = res
        wall = time.perf_counter() - t0
    timings = []
    for i in range(len(wl.requests)):
        res = results[f"r{i}"]
        stamps = res.timestamps or []
        timings.append(RequestTiming(stamps[0] - res.created_time, _tpot(stamps),
                                     len(res.generated_tokens)))
    return SystemResult(timings, wall, {
        "api": "continuous_batching_context_manager + add_request (generate_batch's loop, "
               "per-request max_new_tokens)",
        "attn_implementation": model.config._attn_implementation,
    })


def _tpot(stamps: list[float]) -> float | None:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None


# -- Baton ----------------------------------------------------------------------------------------


def run_baton(model: str, dtype: str, threads: int, wl: Workload, concurrency: int) -> SystemResult:
    """A fresh engine (no prefix cache carried over between runs) under a closed-loop client.

    The client keeps `concurrency` requests in flight, submitting the next prompt as one finishes.
    """
    engine = Engine(model=model, dtype=dtype, num_threads=threads)
    # Warm on a prompt not in the workload, so it seeds no prefix-cache hits.
    engine.generate([wl.requests[0].prompt_ids[:16][::-1]],
                    SamplingParams(max_tokens=4, ignore_eos=True))
    result = _closed_loop(engine, wl, concurrency)
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
    before, t0 = cpu_seconds(), time.perf_counter()
    result = fn()
    after, elapsed = cpu_seconds(), time.perf_counter() - t0
    other = None
    if before is not None and after is not None:
        busy = (after[0] - before[0]) - (after[1] - before[1])
        other = max(0.0, busy / (elapsed * (os.cpu_count() or 1)))
    result.notes["other_cpu_busy"] = other
    say(f"  {result.wall_s:.0f} s" + ("" if other is None else f", others used {other:.0%} of CPU"))
    return result


# -- report ---------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": threads}


def run(*, model: str = "default", num_prompts: int = 16, dtype: str = "bfloat16",
        threads: int | None = None, seed: int = 0,
        progress: Console | None = None) -> dict[str, Any]:
    """Run every system over one workload and return the JSON report."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if num_prompts < 1 or (threads is not None and threads < 1):
        raise ConfigError("--num-prompts and --threads must be >= 1")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    say = progress.print if progress else log.info
    source = resolve(model)
    say(f"loading {source.name} for transformers ({dtype}, threads={threads})")
    hf_model, tokenizer = load_hf(source, DTYPES[dtype])
    limit = getattr(hf_model.config.get_text_config(), "max_position_embeddings", 4096) or 4096
    wl = build_workload(tokenizer, num_prompts, seed, limit)
    say(f"workload: {len(wl.requests)} prompts, {wl.total_output_tokens} output tokens")
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
    summary = {name: res.summary() for name, res in systems.items()}
    roofline_tok_s = bandwidth * 1e9 / bytes_per_token
    c1_tpot = summary["baton_c1"]["tpot_p50_s"]
    c1_decode = 1 / c1_tpot if c1_tpot else None

    def ratio(a: str, b: str) -> float:
        return summary[a]["output_tok_s"] / summary[b]["output_tok_s"]

    return {
        "machine": machine_info(threads),
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
        },
        "roofline_fraction_bs1": c1_decode / roofline_tok_s if c1_decode else None,
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"

    table = Table(title=f"baton bench engine: {report['model']} {report['dtype']}, "
                        f"{report['machine']['threads']} threads", caption="TTFT, TPOT in ms")
    table.add_column("system", no_wrap=True)
    for col in ("tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "wall s"):
        table.add_column(col, justify="right")
    for name, s in report["systems"].items():
        table.add_row(name, f"{s['output_tok_s']:.1f}", ms(s["ttft_p50_s"]), ms(s["ttft_p99_s"]),
                      ms(s["tpot_p50_s"]), ms(s["tpot_p99_s"]), f"{s['wall_s']:.1f}")
    console.print(table)
    busy = {n: s["other_cpu_busy"] for n, s in report["systems"].items()
            if (s.get("other_cpu_busy") or 0) > NOISY}
    if busy:
        console.print("[yellow]other processes were busy during "
                      + ", ".join(f"{n} ({v:.0%} of the CPU)" for n, v in busy.items())
                      + ": those figures are skewed; rerun on a quiet machine[/]")
    for name, value in report["ratios"].items():
        console.print(f"{name}: {value:.2f}x")
    roof = report["roofline"]
    frac = report["roofline_fraction_bs1"]
    console.print(f"roofline: {roof['read_bandwidth_gbps']:.1f} GB/s / "
                  f"{roof['bytes_per_token'] / 1e6:.1f} MB per token = "
                  f"{roof['roofline_tok_s']:.1f} tok/s; baton_c1 decode reaches "
                  + ("-" if frac is None else f"{frac:.1%}"))


def main(*, json_path: str | None = None, model: str = "default", num_prompts: int = 16,
         dtype: str = "bfloat16", threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run the benchmark, write the JSON report to `json_path` (if given), print a table."""
    t0 = time.perf_counter()
    report = run(model=model, num_prompts=num_prompts, dtype=dtype, threads=threads, seed=seed,
                 progress=Console(stderr=True))
    report["bench_wall_s"] = time.perf_counter() - t0
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, Console())
    return report
