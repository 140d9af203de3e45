"""`dtype="auto"`: the engine takes this machine's fastest dtype, measured once and kept."""

from __future__ import annotations

import json

import pytest
import torch

from baton.actors import dtype_choice
from baton.actors.engine import Engine
from baton.engine_config import EngineConfig


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_CACHE", str(tmp_path))
    dtype_choice.cpu_choice.cache_clear()
    yield tmp_path / dtype_choice.CACHE_FILE
    dtype_choice.cpu_choice.cache_clear()


def test_the_choice_is_the_fastest_decode_among_fair_prefills():
    timings = {"float32": (4.0, 10.0), "bfloat16": (2.0, 12.0), "float16": (1.0, 30.0)}
    # float16 decodes fastest but prefills 3x slower than the best: bfloat16 wins.
    assert dtype_choice.choose(timings) == "bfloat16"
    timings["bfloat16"] = (2.0, 25.0)
    assert dtype_choice.choose(timings) == "float32"


def test_a_machine_measures_once_and_keeps_its_choice(fresh_cache, monkeypatch):
    calls = []

    def fake_measure(threads):
        calls.append(threads)
        return {"float32": (3.0, 1.0), "bfloat16": (1.0, 1.5)}

    monkeypatch.setattr(dtype_choice, "measure", fake_measure)
    assert dtype_choice.cpu_choice(2) == "bfloat16"
    saved = json.loads(fresh_cache.read_text())
    assert [v["choice"] for v in saved.values()] == ["bfloat16"]
    dtype_choice.cpu_choice.cache_clear()  # a new process on the same machine
    assert dtype_choice.cpu_choice(2) == "bfloat16" and calls == [2]
    assert dtype_choice.cpu_choice(1) == "bfloat16" and calls == [2, 1]  # other thread count
    fresh_cache.write_text("{not json")  # a damaged file is measured again
    dtype_choice.cpu_choice.cache_clear()
    assert dtype_choice.cpu_choice(2) == "bfloat16" and calls == [2, 1, 2]


def test_measuring_times_every_candidate_this_cpu_has():
    timings = dtype_choice.measure(1)
    assert set(timings) == {dtype_choice.NAMES[d] for d in dtype_choice.candidates()}
    assert "float32" in timings
    assert all(decode > 0 and prefill > 0 for decode, prefill in timings.values())


def test_an_unset_dtype_is_auto_and_explicit_ones_are_kept(fresh_cache):
    assert EngineConfig().dtype == "auto"
    engine = Engine("tiny:llama", num_threads=1, num_kv_blocks=8)
    assert engine.dtype == getattr(torch, dtype_choice.cpu_choice(1))
    assert fresh_cache.exists()
    assert Engine("tiny:llama", dtype="float32", num_kv_blocks=8).dtype == torch.float32
    assert dtype_choice.resolve("float16", torch.device("cpu")) == torch.float16
