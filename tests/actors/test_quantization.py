"""Weight-only int8/int4 engines: what they generate and how far their logits move."""

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


@pytest.mark.parametrize(("dtype", "quantization"), [("bfloat16", "int8"), ("float32", "int4")])
def test_quantized_engine_generates(dtype, quantization):
    engine = Engine("tiny:llama", dtype=dtype, quantization=quantization, quant_group_size=32,
                    num_kv_blocks=16)
    model = engine.model
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert not isinstance(model.lm_head, QuantizedLinear)
    assert model.get_input_embeddings().weight.dtype == engine.dtype
    out = engine.generate([PROMPT[:5], PROMPT], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [8, 8]
    assert all(0 <= t < engine.vocab_size for o in out for t in o.token_ids)


def test_bad_quantization_options_are_refused():
    with pytest.raises(ConfigError, match="quantization must be"):
        Engine("tiny:llama", quantization="int3")
    with pytest.raises(ConfigError, match="quant_group_size"):
        Engine("tiny:llama", quantization="int4", quant_group_size=48)
    with pytest.raises(ConfigError, match=r"cannot quantize .*\.q_proj to int4"):
        Engine("tiny:llama", quantization="int4", quant_group_size=128)  # hidden size is 64
