"""`baton bench kernels`: each Triton kernel against its PyTorch reference, on CUDA.

For every kernel: its time (replayed from a CUDA graph, so Python's launch cost is left out) and
its reference's on the same inputs (eagerly where the reference syncs with the host), the bytes
the kernel must move at least, and the bandwidth that makes as a fraction of the device's peak
(these kernels are memory-bound at serving shapes). Paged attention is also timed against
`scaled_dot_product_attention` on the same keys and values laid out contiguously, the bound a
paged layout should come close to. Without CUDA there is nothing of these to measure: the report
says so. On a CPU with Baton's kernels, the CPU decode attention and skinny matmul are timed too
(`cpu_attention`, `cpu_matmul`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from baton.kernels import kv_blocks, moe, paged_attention, quantized_matmul
from baton.kernels.dispatch import force_backend
from baton.ops.bench import cpu_attention, cpu_matmul
from baton.ops.bench.report import run_and_report

log = logging.getLogger(__name__)

DTYPE = torch.bfloat16
Case = dict[str, Any]


def peak_bandwidth(device: torch.device) -> float:
    """Bytes per second the device's memory can deliver (double data rate x bus width)."""
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


def _time_ms(fn: Callable[[], Any], graph: bool) -> float:
    """Milliseconds per call: replayed from a CUDA graph (device time, no Python launch cost),
    or launched eagerly for code that syncs with the host and cannot be captured."""
    from triton.testing import do_bench, do_bench_cudagraph

    fn()  # compile before any capture
    torch.cuda.synchronize()
    return float(do_bench_cudagraph(fn, rep=50) if graph else do_bench(fn, warmup=10, rep=50))


def _case(name: str, shape: str, nbytes: int, kernel: Callable[[], Any],
          reference: Callable[[], Any], peak: float, reference_syncs: bool = False,
          **baselines: Callable[[], Any]) -> Case:
    with force_backend("triton"):
        kernel_ms = _time_ms(kernel, graph=True)
    reference_ms = _time_ms(reference, graph=not reference_syncs)
    case: Case = {"kernel": name, "shape": shape, "bytes": nbytes, "kernel_ms": kernel_ms,
                  "reference_ms": reference_ms, "speedup_vs_reference": reference_ms / kernel_ms,
                  "kernel_gb_s": nbytes / kernel_ms / 1e6,
                  "fraction_of_peak": nbytes / (kernel_ms / 1e3) / peak,
                  "reference_timing": "eager" if reference_syncs else "cuda_graph"}
    for label, fn in baselines.items():
        case[f"{label}_ms"] = _time_ms(fn, graph=True)
    return case


def _paged_attention_cases(dev: torch.device, peak: float) -> list[Case]:
    b, h, hkv, d, ctx, bs = 32, 32, 8, 128, 2048, 16
    nb = ctx // bs
    k = torch.randn(hkv, b * nb, bs, d, device=dev, dtype=DTYPE)
    v = torch.randn_like(k)
    tables = torch.randperm(b * nb, device=dev).view(b, nb)
    ctx_lens = torch.full((b,), ctx, device=dev)
    kv_bytes = 2 * k.numel() * k.element_size()
    cases = []
    for q_len in (1, 4):
        q = torch.randn(b * q_len, h, d, device=dev, dtype=DTYPE)
        starts = torch.arange(b + 1, device=dev) * q_len if q_len > 1 else None
        args = (q, k, v, tables, ctx_lens, starts)
        # SDPA on the same keys already contiguous per sequence: no block table to follow.
        kc, vc = (t[:, tables.flatten()].view(hkv, b, ctx, d).transpose(0, 1).contiguous()
                  for t in (k, v))
        qc = q.view(b, q_len, h, d).transpose(1, 2)
        mask = None if q_len == 1 else torch.ones(q_len, ctx, dtype=torch.bool, device=dev).tril(
            ctx - q_len)
        cases.append(_case(
            "paged_attention" if q_len == 1 else "paged_attention_verify",
            f"B={b} H={h} Hkv={hkv} D={d} ctx={ctx} block={bs} q={q_len}",
            kv_bytes + 2 * q.numel() * q.element_size(),
            lambda a=args, n=q_len: paged_attention.paged_attention(*a, max_query_len=n),
            lambda a=args: paged_attention.paged_attention_reference(*a, d**-0.5),
            peak, reference_syncs=True,
            sdpa_contiguous=lambda qc=qc, kc=kc, vc=vc, m=mask: F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=m, enable_gqa=True)))
    return cases


def _kv_block_cases(dev: torch.device, peak: float) -> list[Case]:
    layers, hkv, d, bs, n = 30, 8, 128, 16, 128
    keys = [torch.randn(hkv, 1024, bs, d, device=dev, dtype=DTYPE) for _ in range(layers)]
    values = [torch.randn_like(t) for t in keys]
    ids = torch.randperm(1024, device=dev)[:n]
    payload = kv_blocks.gather_blocks_reference(keys, values, ids)
    moved = 2 * payload.numel() * payload.element_size()  # read once, written once
    shape = f"L={layers} Hkv={hkv} D={d} block={bs} blocks={n}"
    return [
        _case("kv_gather", shape, moved, lambda: kv_blocks.gather_blocks(keys, values, ids),
              lambda: kv_blocks.gather_blocks_reference(keys, values, ids), peak),
        _case("kv_scatter", shape, moved,
              lambda: kv_blocks.scatter_blocks(keys, values, ids, payload),
              lambda: kv_blocks.scatter_blocks_reference(keys, values, ids, payload), peak),
    ]


def _quantized_cases(dev: torch.device, peak: float) -> list[Case]:
    n = k = 4096
    w = torch.randn(n, k, device=dev, dtype=DTYPE)
    q8, s8 = quantized_matmul.quantize_int8(w)
    q4, s4, z4 = quantized_matmul.quantize_int4(w, 128)
    cases = []
    for m in (1, 16):
        x = torch.randn(m, k, device=dev, dtype=DTYPE)
        act = 2 * x.numel() * 2
        cases.append(_case(
            "int8_matmul", f"M={m} N={n} K={k}", q8.numel() + s8.numel() * 2 + act,
            lambda x=x: quantized_matmul.int8_matmul(x, q8, s8),
            lambda x=x: quantized_matmul.int8_matmul_reference(x, q8, s8), peak,
            bf16_linear=lambda x=x: F.linear(x, w)))
        cases.append(_case(
            "int4_matmul", f"M={m} N={n} K={k} group=128",
            q4.numel() + (s4.numel() + z4.numel()) * 2 + act,
            lambda x=x: quantized_matmul.int4_matmul(x, q4, s4, z4),
            lambda x=x: quantized_matmul.int4_matmul_reference(x, q4, s4, z4), peak,
            bf16_linear=lambda x=x: F.linear(x, w)))
    return cases


def _moe_cases(dev: torch.device, peak: float) -> list[Case]:
    e, hidden, inter, top_k = 64, 2048, 768, 8
    gate_up = torch.randn(e, 2 * inter, hidden, device=dev, dtype=DTYPE) * hidden**-0.5
    down = torch.randn(e, hidden, inter, device=dev, dtype=DTYPE) * inter**-0.5
    cases = []
    for tokens in (4, 64):
        x = torch.randn(tokens, hidden, device=dev, dtype=DTYPE)
        index = torch.stack([torch.randperm(e, device=dev)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, device=dev).softmax(-1)
        active = int(index.unique().numel())
        args = (x, index, weights, gate_up, down)
        cases.append(_case(
            "moe_grouped_gemm", f"S={tokens} E={e} top_k={top_k} H={hidden} I={inter}",
            active * 3 * inter * hidden * 2 + 2 * x.numel() * 2,
            lambda a=args: moe.moe_experts(*a), lambda a=args: moe.moe_experts_reference(*a),
            peak, reference_syncs=True))
    return cases


def run(progress: Console) -> dict[str, Any]:
    """The report: per kernel timings and bandwidth, or why nothing was measured; the CPU
    decode attention's and skinny matmul's where the CPU has Baton's kernels."""
    report = _run_cuda(progress)
    report["cpu_attention"] = cpu_attention.run(progress)
    report["cpu_matmul"] = cpu_matmul.run(progress)
    return report


def _run_cuda(progress: Console) -> dict[str, Any]:
    if not torch.cuda.is_available():
        log.warning("baton bench kernels: the Triton kernels need CUDA; none measured here")
        return {"status": "skipped", "reason": "needs CUDA: the kernels run on the GPU only",
                "device": "cpu", "cases": []}
    dev = torch.device("cuda")
    peak = peak_bandwidth(dev)
    cases: list[Case] = []
    for name, build in (("paged attention", _paged_attention_cases),
                        ("KV gather/scatter", _kv_block_cases),
                        ("quantized matmul", _quantized_cases), ("MoE", _moe_cases)):
        progress.log(f"timing {name}")
        with torch.inference_mode():
            cases.extend(build(dev, peak))
    return {"status": "ok", "device": torch.cuda.get_device_name(dev),
            "peak_bandwidth_gb_s": peak / 1e9, "dtype": str(DTYPE).removeprefix("torch."),
            "cases": cases}


def print_report(report: dict[str, Any], console: Console) -> None:
    if "cpu_attention" in report:
        cpu_attention.show(report["cpu_attention"], console)
    if "cpu_matmul" in report:
        cpu_matmul.show(report["cpu_matmul"], console)
    if report["status"] != "ok":
        console.print(f"baton bench kernels: Triton kernels skipped ({report['reason']})")
        return
    table = Table(title=f"Kernels on {report['device']} "
                        f"(peak {report['peak_bandwidth_gb_s']:.0f} GB/s)")
    for col in ("kernel", "shape", "kernel ms", "reference ms", "speedup", "GB/s", "of peak",
                "baseline ms"):
        table.add_column(col)
    for c in report["cases"]:
        base = next((f"{k.removesuffix('_ms')} {v:.3f}" for k, v in c.items()
                     if k.endswith("_ms") and k not in ("kernel_ms", "reference_ms")), "")
        table.add_row(c["kernel"], c["shape"], f"{c['kernel_ms']:.3f}",
                      f"{c['reference_ms']:.3f}", f"{c['speedup_vs_reference']:.1f}x",
                      f"{c['kernel_gb_s']:.0f}", f"{c['fraction_of_peak']:.0%}", base)
    console.print(table)


def main(*, json_path: str | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON report to `json_path` (if given), print a table."""
    return run_and_report(run, print_report, json_path)
