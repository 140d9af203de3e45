"""Weight-only int8/int4 engines: what they generate next to the unquantized model, and how far
their logits move."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baton.actors.engine import Engine
from baton.actors.model_runner import prepare_for_inference
from baton.actors.quantized_linear import QuantizedLinear
from baton.actors.tiny import tiny_model
from baton.errors import ConfigError
from baton.sampling import SamplingParams
from tests.conftest import hf_greedy

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 100, 120, 33, 45]


def _logits(quantization: str | None, group_size: int = 128) -> torch.Tensor:
    model = tiny_model("qwen3")
    if quantization:
        prepare_for_inference(model, torch.float32, torch.device("cpu"), quantization, group_size)
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits[0]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def test_int8_logits_stay_close_to_the_float_model():
    base, quant = _logits(None), _logits("int8")
    assert _cosine(quant, base) > 0.99
    agree = (quant.argmax(-1) == base.argmax(-1)).float().mean().item()
    assert agree >= 0.8


def test_int4_logits_follow_the_float_model_and_finer_groups_follow_closer():
    base = _logits(None)
    fine, coarse = _logits("int4", 32), _logits("int4", 64)
    assert _cosine(fine, base) > 0.85
    assert (fine - base).norm() < (coarse - base).norm()


def _assert_quantized(engine: Engine) -> None:
    """Every linear but the output head holds quantized weights; embeddings keep the dtype."""
    model = engine.model
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert not isinstance(model.lm_head, QuantizedLinear)
    assert model.get_input_embeddings().weight.dtype == engine.dtype


def test_int8_engine_picks_what_the_unquantized_engine_would():
    """bf16 + int8: from the same text, each token the int8 engine picks is the unquantized
    engine's choice too (or within a near tie of it), with a log-probability close to it."""
    base = Engine("tiny:llama", dtype="bfloat16", num_kv_blocks=16)
    quant = Engine("tiny:llama", dtype="bfloat16", quantization="int8", num_kv_blocks=16)
    _assert_quantized(quant)
    prompts = [PROMPT[:5], PROMPT]
    outs = quant.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0))
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out.token_ids) == 8 and out.logprobs is not None
        for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            [step] = base.generate([prompt + out.token_ids[:i]],
                                   SamplingParams(max_tokens=1, ignore_eos=True, logprobs=5))
            assert step.logprobs is not None
            top = step.logprobs[0].top
            assert token in top, (i, token, top)
            assert max(top.values()) - top[token] < 0.25
            assert abs(lp.logprob - top[token]) < 0.25


def test_int4_engine_matches_transformers_on_the_same_int4_weights():
    engine = Engine("tiny:llama", dtype="float32", quantization="int4", quant_group_size=32,
                    num_kv_blocks=16)
    _assert_quantized(engine)
    ref = prepare_for_inference(tiny_model("llama"), torch.float32, torch.device("cpu"), "int4",
                                32)
    prompts = [PROMPT[:5], PROMPT]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(ref, p, 8, stop_at_eos=False)
                                           for p in prompts]


def test_bad_quantization_options_are_refused():
    with pytest.raises(ConfigError, match="quantization must be"):
        Engine("tiny:llama", quantization="int3")
    with pytest.raises(ConfigError, match="quant_group_size"):
        Engine("tiny:llama", quantization="int4", quant_group_size=48)
    with pytest.raises(ConfigError, match=r"cannot quantize .*\.q_proj to int4"):
        Engine("tiny:llama", quantization="int4", quant_group_size=128)  # hidden size is 64
