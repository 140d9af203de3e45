"""`baton bench engine` runs end to end and writes the report its users read (tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RATIOS = {"single_stream_vs_hf_generate": ("baton_c1", "hf_generate"),
          "c16_vs_hf_static_batch": ("baton_c16", "hf_static_batch"),
          "c16_vs_hf_generate_batch": ("baton_c16", "hf_generate_batch"),
          "int4_single_stream_vs_bfloat16": ("baton_int4_c1", "baton_c1")}


def test_bench_engine_writes_ratios_and_roofline(tmp_path):
    out = tmp_path / "bench.json"
    baton = str(Path(sys.executable).parent / "baton")
    res = subprocess.run([baton, "bench", "engine", "--model", "tiny:llama", "--num-prompts", "3",
                          "--max-output-tokens", "24", "--quantization", "int4",
                          "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    systems = report["systems"]
    assert set(systems) == {"hf_generate", "hf_static_batch", "hf_generate_batch",
                            "baton_c1", "baton_c4", "baton_c16", "baton_int4_c1"}
    # Every system, the baselines too, produced the workload's tokens for its three requests.
    assert max(report["workload"]["output_tokens"]) <= 24
    for s in systems.values():
        assert s["num_requests"] == 3
        assert s["output_tokens"] == report["workload"]["total_output_tokens"]
        assert s["output_tok_s"] == pytest.approx(s["output_tokens"] / s["wall_s"])
    assert [systems[f"baton_c{c}"]["concurrency"] for c in (1, 4, 16)] == [1, 4, 16]
    assert (systems["baton_int4_c1"]["concurrency"], systems["baton_int4_c1"]["quantization"],
            systems["baton_c1"]["quantization"]) == (1, "int4", None)
    # Each ratio is the quotient of the two systems' measured throughput.
    assert report["ratios"] == {
        name: pytest.approx(systems[a]["output_tok_s"] / systems[b]["output_tok_s"])
        for name, (a, b) in RATIOS.items()}
    roof = report["roofline"]
    assert roof["roofline_tok_s"] == pytest.approx(
        roof["read_bandwidth_gbps"] * 1e9 / roof["bytes_per_token"])
    assert roof["baton_c1_decode_tok_s"] == pytest.approx(1 / systems["baton_c1"]["tpot_p50_s"])
    assert report["roofline_fraction_bs1"] == pytest.approx(
        roof["baton_c1_decode_tok_s"] / roof["roofline_tok_s"])
    assert "single_stream_vs_hf_generate" in res.stdout
    # A tiny model comes from no GGUF file: the llama.cpp peer has nothing to run, and says so.
    assert report["peers"]["llama_cpp"] == {"status": "no GGUF file behind this model",
                                            "gguf": None, "quantization": None}
    assert "llama.cpp peer: no GGUF file behind this model" in res.stdout
