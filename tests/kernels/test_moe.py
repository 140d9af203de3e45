"""MoE grouped GEMM: the Triton path against the reference and against transformers' experts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from baton.actors.moe_experts import (
    CPU_IMPLEMENTATION,
    EXPERTS_IMPLEMENTATION,
    SKINNY,
    use_baton_experts,
)
from baton.errors import ConfigError
from baton.kernels import cpu_decode
from baton.kernels.dispatch import force_backend
from baton.kernels.moe import moe_experts, moe_experts_reference
from tests.kernels.conftest import DEVICE, assert_close


def _experts(num_experts, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    return gate_up.to(dtype).to(DEVICE), down.to(dtype).to(DEVICE)


def _routing(tokens, top_k, experts, seed=0):
    """Each token's `top_k` distinct experts drawn from `experts`, softmaxed weights."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts)
    index = torch.stack([pool[torch.randperm(len(pool), generator=g)[:top_k]]
                         for _ in range(tokens)])
    weights = torch.randn(tokens, top_k, generator=g).softmax(-1)
    return index.to(DEVICE), weights.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "top_k", "experts", "hidden", "inter"), [
    (1, 2, range(8), 64, 32),  # one token
    (7, 2, [1, 4, 6], 64, 32),  # ragged, most of the 8 experts empty
    (20, 1, [3], 48, 24),  # every token on one expert: more rows than a tile; sizes not tiles
])
def test_grouped_gemm_matches_reference(triton_path, dtype, tokens, top_k, experts, hidden,
                                        inter):
    gate_up, down = _experts(8, hidden, inter, dtype)
    x = torch.randn(tokens, hidden).to(dtype).to(DEVICE)
    index, weights = _routing(tokens, top_k, list(experts))
    out = moe_experts(x, index, weights, gate_up, down)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, moe_experts_reference(x, index, weights, gate_up, down), dtype)


def test_pairs_for_experts_elsewhere_are_dropped(triton_path):
    """Expert id E marks a pair another rank serves: it adds nothing here."""
    gate_up, down = _experts(4, 32, 16, torch.float32)
    x = torch.randn(5, 32, device=DEVICE)
    index, weights = _routing(5, 2, [0, 2])
    elsewhere = index.clone()
    elsewhere[:, 1] = 4
    out = moe_experts(x, elsewhere, weights, gate_up, down)
    only_first = moe_experts_reference(x, index[:, :1], weights[:, :1], gate_up, down)
    assert_close(out, only_first, torch.float32)


def test_mismatched_expert_weights_are_refused():
    gate_up, down = _experts(4, 32, 16, torch.float32)
    index, weights = _routing(2, 1, [0])
    with pytest.raises(ConfigError, match="do not fit"):
        moe_experts(torch.randn(2, 32, device=DEVICE), index, weights, gate_up, down[:, :, :8])


def _tiny_moe(model_type: str):
    extra = {"num_experts": 8} if model_type == "qwen3_moe" else {"num_local_experts": 8}
    config = AutoConfig.for_model(
        model_type, vocab_size=257, hidden_size=64, intermediate_size=64,
        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, max_position_embeddings=256,
        **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval().to(DEVICE)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_moe_model_logits_match_transformers_experts(model_type):
    model = _tiny_moe(model_type)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]], device=DEVICE)
    model.set_experts_implementation("eager")
    with torch.inference_mode():
        expected = model(ids).logits
    with force_backend("triton"):
        assert use_baton_experts(model, DEVICE)
        assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
        with torch.inference_mode():
            got = model(ids).logits
    assert_close(got, expected, torch.float32)


def test_default_experts_are_the_grouped_gemm_on_cuda_and_the_per_expert_loop_on_cpu():
    model = _tiny_moe("qwen3_moe")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]], device=DEVICE)
    with torch.inference_mode():
        before = model(ids).logits
    want = EXPERTS_IMPLEMENTATION if DEVICE.type == "cuda" else CPU_IMPLEMENTATION
    assert use_baton_experts(model, DEVICE) == want
    assert model.config._experts_implementation == want
    with torch.inference_mode():
        after = model(ids).logits
    assert_close(after, before, torch.float32)


@pytest.mark.skipif(DEVICE.type != "cpu" or cpu_decode.kernel() is None,
                    reason="Baton's CPU kernels are not built here")
def test_bf16_cpu_experts_run_on_the_skinny_kernel_with_transformers_numbers():
    model = _tiny_moe("mixtral").to(torch.bfloat16)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]], device=DEVICE)
    with torch.inference_mode():
        before = model(ids).logits.float()
        one = model(ids[:, :1]).logits.float()
    assert use_baton_experts(model, DEVICE) == CPU_IMPLEMENTATION
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    assert experts and all(getattr(m, SKINNY, 0) > 0 for m in experts)
    with torch.inference_mode():
        after = model(ids).logits.float()  # 11 rows: the weights unpacked for the call
        after_one = model(ids[:, :1]).logits.float()  # one row: the skinny kernel
    for got, want in ((after, before), (after_one, one)):
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
