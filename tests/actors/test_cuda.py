"""The engine on CUDA (skipped on machines without it)."""

from __future__ import annotations

import pytest

from baton.actors.engine import Engine
from baton.actors.tiny import tiny_model
from baton.sampling import SamplingParams
from tests.conftest import assert_no_leaks, hf_greedy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_models_match_generate_on_cuda(arch):
    engine = Engine(f"tiny:{arch}", dtype="float32", device="cuda")
    ref = tiny_model(arch)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6][: n + 1] * (n + 1) for n in range(8)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(ref, p, 20, stop_at_eos=False)
    assert_no_leaks(engine)


def test_default_model_generates_on_cuda():
    engine = Engine(device="cuda")
    text = engine.apply_chat_template([{"role": "user", "content": "Capital of France?"}])
    out = engine.generate([text], SamplingParams(max_tokens=12))[0]
    assert "Paris" in out.text
    assert_no_leaks(engine)
