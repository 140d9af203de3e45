"""`baton bench gpu`: engine decode on a GPU, with and without CUDA graphs, as a share of HBM
bandwidth.

The model is a Llama of about 1.1B parameters (TinyLlama's shape) with random weights, built from
its config on the GPU (nothing is downloaded) and saved once to a directory with the tiny
byte-level tokenizer (prompts are token ids). For each of batch 1 and `--batch` (32), with and
without graphs, in alternating order: `--rounds` generations of `--tokens` decode tokens from
16-token prompts; a step's time is the decode time over its steps (the first token, which
carries the prefill, left out). The bandwidth roofline share is what a step reads, every
weight once plus each request's KV so far, over its time, against a device-to-device copy's
measured bandwidth.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from baton.ops.bench.report import run_and_report
from baton.sampling import SamplingParams

MODEL_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                   max_position_embeddings=2048, tie_word_embeddings=False)
PROMPT_TOKENS = 16


def random_model(directory: Path, make: Callable[[], Any], device: str = "cuda") -> Path:
    """A random-weight model, `make()` built on `device` in bf16, saved into `directory` once
    with the tiny byte-level tokenizer (prompts are token ids or bytes)."""
    from baton.actors.tiny import tiny_tokenizer

    if not (directory / "config.json").exists():
        with torch.device(device):
            model = make().to(torch.bfloat16)
        model.save_pretrained(directory)
        tiny_tokenizer().save_pretrained(directory)
        del model
        if device != "cpu":
            torch.cuda.empty_cache()
    return directory


def build_model(directory: Path) -> Path:
    """The random-weight ~1.1B Llama, saved into `directory` once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return random_model(directory, lambda: LlamaForCausalLM(LlamaConfig(
        **MODEL_SHAPE, bos_token_id=256, eos_token_id=256, pad_token_id=256)))


def copy_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best device-to-device copy bandwidth (read plus write), GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def step_seconds(engine, batch: int, tokens: int) -> float:
    """Decode seconds per step: `batch` requests of `tokens` tokens at once."""
    prompts = [[(7 * b + i) % 250 + 3 for i in range(PROMPT_TOKENS)] for b in range(batch)]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, f"b{batch}-{time.monotonic_ns()}-{i}")
    first = None
    while engine.has_unfinished():
        engine.step()
        if first is None and all(s.num_output_tokens >= 1 for s in engine.scheduler.running) \
                and not engine.num_waiting:
            torch.cuda.synchronize()
            first = time.perf_counter()
    torch.cuda.synchronize()
    assert first is not None
    return (time.perf_counter() - first) / (tokens - 1)


def run(*, batch: int = 32, tokens: int = 128, rounds: int = 3, model_dir: str | None = None,
        progress: Console) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"bench": "gpu", "status": "skipped",
                "reason": "baton bench gpu needs CUDA; this machine has no CUDA device"}
    from baton.actors.engine import Engine

    directory = build_model(Path(model_dir or tempfile.mkdtemp(prefix="baton-gpu-llama-")))
    engines = {graphs: Engine(model=str(directory), dtype="bfloat16", device="cuda",
                              max_num_seqs=max(batch, 1), cuda_graphs=graphs)
               for graphs in (True, False)}
    weights = sum(p.numel() * p.element_size() for p in engines[True].model.parameters())
    spec = engines[True].cache.spec
    kv_per_token = spec.bytes_per_block // spec.block_size
    bandwidth = copy_bandwidth_gbps()
    rows: list[dict[str, Any]] = []
    for size in (1, batch):
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds + 1):  # the first round warms up (and captures)
            for graphs in ((True, False) if r % 2 else (False, True)):
                seconds = step_seconds(engines[graphs], size, tokens)
                if r:
                    times[graphs].append(seconds)
        for graphs, values in times.items():
            step = statistics.median(values)
            context = PROMPT_TOKENS + tokens / 2  # the KV a step reads, on average
            read = weights + size * context * kv_per_token
            rows.append({"batch": size, "cuda_graphs": graphs, "step_ms": step * 1e3,
                         "tok_s": size / step, "read_gbps": read / step / 1e9,
                         "roofline_fraction": read / step / 1e9 / bandwidth})
            progress.print(f"batch {size}, graphs {graphs}: {step * 1e3:.2f} ms a step")
    by = {(row["batch"], row["cuda_graphs"]): row for row in rows}
    graphs = engines[True].runner.graphs
    return {
        "bench": "gpu", "status": "ok", "device": torch.cuda.get_device_name(),
        "params": int(weights // 2),
        "copy_bandwidth_gbps": bandwidth, "rows": rows,
        "graphs_enabled": bool(graphs is not None and graphs.enabled),
        "ratios": {
            "roofline_fraction_bs1": by[(1, True)]["roofline_fraction"],
            "roofline_fraction_bs1_eager": by[(1, False)]["roofline_fraction"],
            "graphs_speedup_bs1": by[(1, False)]["step_ms"] / by[(1, True)]["step_ms"],
            f"graphs_speedup_bs{batch}": by[(batch, False)]["step_ms"]
            / by[(batch, True)]["step_ms"],
        },
    }


def print_report(report: dict[str, Any], console: Console) -> None:
    if report["status"] != "ok":
        console.print(report["reason"])
        return
    table = Table(title=f"bench gpu: {report['device']}, {report['params'] / 1e9:.2f}B params, "
                        f"copy {report['copy_bandwidth_gbps']:.0f} GB/s")
    for col in ("batch", "graphs", "step ms", "tok/s", "read GB/s", "roofline"):
        table.add_column(col, justify="right")
    for row in report["rows"]:
        table.add_row(str(row["batch"]), str(row["cuda_graphs"]), f"{row['step_ms']:.2f}",
                      f"{row['tok_s']:.0f}", f"{row['read_gbps']:.0f}",
                      f"{row['roofline_fraction']:.2f}")
    console.print(table)


def main(*, json_path: str | None = None, **kw: Any) -> dict[str, Any]:
    return run_and_report(lambda progress: run(progress=progress, **kw), print_report, json_path)
