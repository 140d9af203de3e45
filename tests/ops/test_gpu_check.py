"""The GPU script's sections, run on the CPU at toy sizes: what a GPU session will run must not
rot between the sessions that have a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.ops import gpu_check


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "cpu")
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, max_position_embeddings=4096,
                 tie_word_embeddings=False)
    monkeypatch.setattr(gpu_check, "PROFILE_SHAPE", {**small, "intermediate_size": 128})
    monkeypatch.setattr(gpu_check, "PROFILE_GRID", dict(prefill_lens=(16, 64), batches=(1, 4),
                                                        contexts=(32,)))
    monkeypatch.setattr(gpu_check, "MOE_SHAPE", {**small, "intermediate_size": 96,
                                                 "num_local_experts": 8,
                                                 "num_experts_per_tok": 2})


def test_the_sections_run_and_add_to_one_report(on_cpu, tmp_path: Path) -> None:
    assert gpu_check.main(["--out", str(tmp_path), "--sections", "spec,profile"]) == 0
    assert gpu_check.main(["--out", str(tmp_path), "--sections", "moe"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["sections"]) == ["spec", "profile", "moe"]
    spec = report["sections"]["spec"]["result"]
    assert spec["mixed_batch_equal_to_none"] and not spec["blocks_leaked"]
    assert all(m["equal_to_none"] and m["drafted"] > 0 for m in spec["methods"].values())
    profile = json.loads((tmp_path / "profile_h200.json").read_text())
    assert [b for b, _, _ in profile["decode"]] == [1, 4]
    assert "aten::" in (tmp_path / "prefill_trace.txt").read_text()
    assert (tmp_path / "bench_moe_gpu.json").exists()


def test_a_failed_section_is_reported_and_the_others_still_run(on_cpu, tmp_path: Path,
                                                               monkeypatch) -> None:
    def broken(_scratch, _out, _gpu):
        raise RuntimeError("no such GPU")

    monkeypatch.setattr(gpu_check, "run_profile", broken)
    assert gpu_check.main(["--out", str(tmp_path), "--sections", "profile,spec"]) == 1
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert "no such GPU" in sections["profile"]["result"]["error"]
    assert sections["spec"]["result"]["ok"]


def test_decode_trace_names_the_host_side_python(on_cpu) -> None:
    text = gpu_check.trace_decode("tiny:llama", steps=4)
    assert "aten::" in text and "scheduler.py" in text
