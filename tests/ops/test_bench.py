"""`baton bench engine` runs end to end and writes the report its users read (tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_engine_writes_ratios_and_roofline(tmp_path):
    out = tmp_path / "bench.json"
    baton = str(Path(sys.executable).parent / "baton")
    res = subprocess.run([baton, "bench", "engine", "--model", "tiny:llama", "--num-prompts", "3",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert set(report["ratios"]) >= {"single_stream_vs_hf_generate", "c16_vs_hf_static_batch",
                                     "c16_vs_hf_generate_batch"}
    assert all(v > 0 for v in report["ratios"].values())
    assert report["roofline_fraction_bs1"] > 0
    systems = report["systems"]
    assert set(systems) == {"hf_generate", "hf_static_batch", "hf_generate_batch",
                            "baton_c1", "baton_c4", "baton_c16"}
    # Every system produced the same useful tokens for the same workload.
    assert len({s["output_tokens"] for s in systems.values()}) == 1
    assert "single_stream_vs_hf_generate" in res.stdout
