"""`baton bench kernels` and `baton bench gpu`: on CUDA their timings; without CUDA a report
saying so, exit 0 (and `bench kernels` times the CPU decode attention and skinny matmul where
it can)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from baton.kernels import cpu_decode
from baton.ops.bench import cpu_attention, cpu_matmul
from baton.ops.cli import app


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the benchmark would run")
def test_bench_kernels_without_cuda_says_it_needs_cuda_and_succeeds(tmp_path):
    out = tmp_path / "kernels.json"
    result = CliRunner().invoke(app, ["bench", "kernels", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "needs CUDA" in result.output
    report = json.loads(out.read_text())
    assert report["status"] == "skipped" and "CUDA" in report["reason"]
    assert report["cases"] == []
    # The CPU decode attention and skinny matmul are timed wherever Baton's CPU kernels are built.
    cpu = report["cpu_attention"]
    matmul = report["cpu_matmul"]
    if cpu_decode.kernel() is None:
        assert cpu["status"] == "skipped" and matmul["status"] == "skipped"
        return
    assert matmul["status"] == "ok" and "CPU skinny matmul" in result.output
    assert [c["rows"] for c in matmul["cases"]] == list(cpu_matmul.ROWS)
    assert all(c[k] > 0 for c in matmul["cases"] for k in (
        "projections_ms", "projections_onednn_ms", "lm_head_ms", "lm_head_onednn_ms"))
    assert cpu["status"] == "ok" and "CPU decode attention" in result.output
    assert {(c["keys"], c["case"]) for c in cpu["cases"]} == {
        (k, name) for k in cpu_attention.KEYS for name, _, _ in cpu_attention.CASES}
    assert all(c["kernel_ms"] > 0 and c["sdpa_ms"] > 0 for c in cpu["cases"])


@pytest.mark.gpu
def test_bench_kernels_on_cuda_times_every_kernel(tmp_path):
    out = tmp_path / "kernels.json"
    result = CliRunner().invoke(app, ["bench", "kernels", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["status"] == "ok" and report["peak_bandwidth_gb_s"] > 0
    names = {c["kernel"] for c in report["cases"]}
    assert names == {"paged_attention", "paged_attention_verify", "kv_gather", "kv_scatter",
                     "int8_matmul", "int4_matmul", "moe_grouped_gemm"}
    for case in report["cases"]:
        assert case["kernel_ms"] > 0 and case["reference_ms"] > 0
        assert 0 < case["fraction_of_peak"] < 1.5  # sanity: caches can beat DRAM a little
    attention = [c for c in report["cases"] if c["kernel"].startswith("paged_attention")]
    assert all(c["sdpa_contiguous_ms"] > 0 for c in attention)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the benchmark would run")
def test_bench_gpu_without_cuda_says_it_needs_cuda_and_succeeds(tmp_path):
    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(app, ["bench", "gpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "needs CUDA" in result.output
    report = json.loads(out.read_text())
    assert report["status"] == "skipped" and "CUDA" in report["reason"]


@pytest.mark.gpu
def test_bench_gpu_times_decode_with_and_without_graphs(tmp_path):
    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(app, ["bench", "gpu", "--json", str(out), "--batch", "4",
                                      "--tokens", "16", "--rounds", "1",
                                      "--model-dir", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["status"] == "ok" and report["graphs_enabled"]
    assert {(r["batch"], r["cuda_graphs"]) for r in report["rows"]} == {
        (1, True), (1, False), (4, True), (4, False)}
    assert all(0 < r["roofline_fraction"] < 1.5 for r in report["rows"])
