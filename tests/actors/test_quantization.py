"""Weight-only int8/int4 engines: what they generate next to the unquantized model, and how far
their logits move."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from baton.actors.engine import Engine
from baton.actors.model_runner import prepare_for_inference
from baton.actors.model_source import resolve
from baton.actors.quantized_linear import QuantizedLinear, int4_group_size
from baton.actors.tiny import tiny_model
from baton.errors import ConfigError
from baton.kernels.quantized_matmul import int4_matmul_reference, quantize_int4
from baton.kernels.quantized_matmul_cpu import force_int4_cpu_path
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


@pytest.mark.parametrize("path", ["packed", "dequantize"])
def test_int4_engine_matches_transformers_on_the_same_int4_weights(path):
    """float32: the engine on packed (or dequantized) int4 weights generates exactly what
    transformers does on Baton's dequantizing reference, from the same int4 weights."""
    with force_int4_cpu_path(path):
        engine = Engine("tiny:llama", dtype="float32", quantization="int4", num_kv_blocks=16)
    _assert_quantized(engine)
    layers = [m for m in engine.model.modules() if isinstance(m, QuantizedLinear)]
    assert {m.group_size for m in layers} == {64}  # unset: the largest that fits 64 and 128
    assert all(m.packed == (path == "packed") for m in layers)
    with force_int4_cpu_path("dequantize"):
        ref = prepare_for_inference(tiny_model("llama"), torch.float32, torch.device("cpu"),
                                    "int4")
    prompts = [PROMPT[:5], PROMPT]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(ref, p, 8, stop_at_eos=False)
                                           for p in prompts]


def _linear_inputs(model) -> dict[str, int]:
    head = model.get_output_embeddings()
    return {name: m.in_features for name, m in model.named_modules()
            if type(m) is nn.Linear and m is not head}


def test_unset_int4_group_size_is_the_largest_that_fits_every_layer():
    config = AutoConfig.from_pretrained(resolve("default").path)
    with torch.device("meta"):  # the default model's shapes, without its weights
        default = AutoModelForCausalLM.from_config(config)
    assert set(_linear_inputs(default).values()) == {576, 1536}
    assert int4_group_size(_linear_inputs(default), None) == 64  # 576 = 64 * 9
    assert int4_group_size(_linear_inputs(tiny_model("llama")), None) == 64
    assert int4_group_size({"a": 256, "b": 384}, None) == 128
    assert int4_group_size({"a": 256, "b": 96}, None) == 32


def test_bad_quantization_options_are_refused():
    with pytest.raises(ConfigError, match="quantization must be"):
        Engine("tiny:llama", quantization="int3")
    with pytest.raises(ConfigError, match="quant_group_size"):
        Engine("tiny:llama", quantization="int4", quant_group_size=48)
    with pytest.raises(ConfigError) as bad:
        Engine("tiny:llama", quantization="int4", quant_group_size=128)  # hidden size is 64
    assert str(bad.value).startswith("cannot quantize model.layers.0.self_attn.q_proj to int4 "
                                     "in groups of 128: its input size 64 is not a multiple")
    assert "the group sizes that fit every layer are [64, 32]" in str(bad.value)
    with pytest.raises(ConfigError, match=r"lm\.in_proj .* input size 100 .* use int8"):
        int4_group_size({"lm.in_proj": 100}, None)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _linear(n: int, k: int, bias: bool, dtype: torch.dtype = torch.float32) -> nn.Linear:
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_rand(n, k) * k ** -0.5)
        if bias:
            linear.bias.copy_(_rand(n, seed=2))
    return linear.to(dtype)


def test_packed_layer_stays_close_to_the_unquantized_layer():
    """4-bit error: a few percent of the output, in bfloat16 as in float32."""
    for dtype in (torch.float32, torch.bfloat16):
        linear = _linear(1536, 576, bias=False, dtype=dtype)
        x = _rand(4, 576, seed=1).to(dtype)
        with force_int4_cpu_path("packed"):
            layer = QuantizedLinear(linear, "int4", 64)
        assert layer.packed and layer.qweight is None  # one layout kept, not two
        with torch.inference_mode():
            exact, got = linear(x).float(), layer(x).float()
        assert ((got - exact).norm() / exact.norm()).item() < 0.1


def test_a_layer_the_packed_kernel_cannot_take_keeps_the_reference_layout():
    """The packed layout needs whole tiles of 16 output channels; 40 falls back, same product."""
    linear = _linear(40, 64, bias=True)
    with force_int4_cpu_path("packed"):
        layer = QuantizedLinear(linear, "int4", 32)
    assert not layer.packed
    x = _rand(3, 64, seed=1)
    q, scales, zeros = quantize_int4(linear.weight.detach(), 32)
    with torch.inference_mode():
        out = layer(x)
    torch.testing.assert_close(out, int4_matmul_reference(x, q, scales, zeros,
                                                          linear.bias.detach()))
