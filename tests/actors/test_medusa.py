"""Medusa heads: fresh heads are the LM head, saved heads come back on the model they fit (and a
clear error on one they do not); token-conditioned heads see the token before their target."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from baton.actors.medusa import CONFIG_FILE, WEIGHTS_FILE, MedusaHeads
from baton.actors.quantized_linear import QuantizedLinear
from baton.actors.tiny import tiny_config, tiny_model
from baton.errors import ConfigError, ModelLoadError
from baton.kernels import cpu_decode
from baton.kernels.quantized_matmul import quantize_int8


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _trained_like(model, num_heads: int = 3, seed: int = 0,
                  conditioned: bool = False) -> MedusaHeads:
    """Heads with random (non-zero) weights, as if trained."""
    heads = MedusaHeads.for_model(model, num_heads, base_model="tiny:llama",
                                  conditioned=conditioned)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in heads.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return heads


def _other_model(**overrides):
    config = tiny_config("llama")
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).eval()


def test_fresh_heads_are_the_lm_head(model):
    heads = MedusaHeads.for_model(model, 4)
    hidden = torch.randn(5, 64)
    assert torch.equal(heads.head_states(hidden), hidden.expand(4, 5, 64))
    out = heads(hidden)
    assert out.shape == (4, 5, 257)
    expected = model.lm_head(hidden)
    for i in range(4):  # one GEMM over all heads: equal up to its summation order
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


def test_heads_differ_from_each_other_once_trained(model):
    heads = _trained_like(model)
    out = heads(torch.randn(2, 64))
    assert not torch.allclose(out[0], out[1])


def test_save_load_round_trip(model, tmp_path):
    heads = _trained_like(model)
    heads.save(tmp_path, extra={"training": {"agreement": [0.5, 0.4, 0.3]}})
    # Only the heads are saved, never the model's own LM head.
    assert set(load_file(str(tmp_path / WEIGHTS_FILE))) == {"weight", "bias"}
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (cfg["num_heads"], cfg["hidden_size"], cfg["vocab_size"]) == (3, 64, 257)
    assert cfg["base_model"] == "tiny:llama" and cfg["training"]["agreement"] == [0.5, 0.4, 0.3]

    loaded = MedusaHeads.load(tmp_path, model)
    hidden = torch.randn(7, 64)
    assert torch.equal(loaded(hidden), heads(hidden))
    assert all(not p.requires_grad for p in loaded.parameters())
    # Serving's folded heads draft from the same logits (one GEMM: up to summation order).
    logits, token_ids = loaded.candidates(hidden)
    assert token_ids is None
    torch.testing.assert_close(logits, heads(hidden), rtol=1e-5, atol=1e-5)


def test_heads_with_a_vocabulary_draft_only_among_its_tokens(model, tmp_path):
    heads = _trained_like(model)
    heads.vocab = torch.tensor([3, 17, 18, 100, 256])
    heads.save(tmp_path)
    assert set(load_file(str(tmp_path / WEIGHTS_FILE))) == {"weight", "bias", "vocab"}
    loaded = MedusaHeads.load(tmp_path, model)
    assert torch.equal(loaded.vocab, heads.vocab)
    hidden = torch.randn(4, 64)
    logits, token_ids = loaded.candidates(hidden)
    assert torch.equal(token_ids, heads.vocab)
    # The full vocabulary's logits, restricted to those tokens.
    torch.testing.assert_close(logits, heads(hidden)[:, :, heads.vocab], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads.candidates(hidden)[0], logits, rtol=1e-5, atol=1e-5)


def test_heads_with_a_vocabulary_outside_the_model_are_refused(model, tmp_path):
    heads = _trained_like(model)
    heads.vocab = torch.tensor([3, 257])  # the tiny model's vocabulary ends at 256
    heads.save(tmp_path)
    with pytest.raises(ModelLoadError, match="bad vocab"):
        MedusaHeads.load(tmp_path, model)


def test_load_follows_the_models_dtype(model, tmp_path):
    _trained_like(model).save(tmp_path)
    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    loaded = MedusaHeads.load(tmp_path, bf16)
    assert loaded.weight.dtype == torch.bfloat16
    hidden = torch.randn(2, 64, dtype=torch.bfloat16)
    assert loaded(hidden).dtype == torch.bfloat16
    # Serving's folded heads: weight-only int8 on Baton's kernel where it takes the weights
    # (drafting reads them cold on every pass), else packed for oneDNN where it can. Their
    # logits are the heads' own with those weights, up to bf16 rounding.
    logits, _ = loaded.candidates(hidden)
    assert logits.dtype == torch.bfloat16
    int8 = cpu_decode.takes_int8(loaded.weight.reshape(-1, 64))
    assert isinstance(loaded._proj, QuantizedLinear) == int8
    assert isinstance(loaded._draft_head, QuantizedLinear) == int8
    want = _int8_weights_candidates(loaded, hidden) if int8 else loaded(hidden)
    torch.testing.assert_close(logits.float(), want.float(), rtol=0.05, atol=0.05)


def _int8_weights_candidates(heads: MedusaHeads, hidden: torch.Tensor) -> torch.Tensor:
    """Plain heads' logits in float32 with each serving weight rounded to int8 (per row)."""
    def rounded(weight: torch.Tensor) -> torch.Tensor:
        qweight, scales = quantize_int8(weight)
        return qweight.float() * scales.float()[:, None]

    h = hidden.float()
    proj = h @ rounded(heads.weight.reshape(-1, h.shape[1])).T + heads.bias.reshape(-1).float()
    states = h + F.silu(proj.view(len(h), heads.num_heads, -1).transpose(0, 1))
    return states @ rounded(heads.lm_head.weight).T


@pytest.mark.parametrize("overrides, named", [
    ({"hidden_size": 32, "intermediate_size": 64}, "hidden size 32"),
    ({"vocab_size": 300}, "vocab 300"),
])
def test_heads_for_another_model_shape_are_refused(model, tmp_path, overrides, named):
    _trained_like(model).save(tmp_path)
    with pytest.raises(ConfigError) as err:
        MedusaHeads.load(tmp_path, _other_model(**overrides))
    assert named in err.value.message
    assert "baton train-heads" in err.value.message


def test_missing_heads_name_the_command_that_makes_them(model, tmp_path):
    with pytest.raises(ConfigError, match="baton train-heads"):
        MedusaHeads.load(tmp_path / "nowhere", model)


def test_corrupt_heads_file_is_a_load_error(model, tmp_path):
    _trained_like(model).save(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="baton train-heads"):
        MedusaHeads.load(tmp_path, model)


def test_heads_from_another_checkpoint_load_with_a_warning(model, tmp_path, caplog):
    _trained_like(model).save(tmp_path)
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.norm.weight.add_(0.5)
    with caplog.at_level(logging.WARNING, logger="baton.actors.medusa"):
        MedusaHeads.load(tmp_path, model)
        assert not caplog.records
        MedusaHeads.load(tmp_path, other)
    assert "different checkpoint" in caplog.text


# -- token-conditioned heads -----------------------------------------------------------------------


def test_conditioned_heads_round_trip_and_serve_the_logits_they_trained_with(model, tmp_path):
    heads = _trained_like(model, conditioned=True)
    heads.vocab = torch.arange(0, 257, 3)
    heads.save(tmp_path)
    assert set(load_file(str(tmp_path / WEIGHTS_FILE))) == {
        "weight", "bias", "cond", "out", "out_bias", "vocab"}
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["conditioned"] is True
    loaded = MedusaHeads.load(tmp_path, model)
    assert loaded.conditioned
    hidden = torch.randn(5, 64)
    prev = torch.randint(257, (3, 5))
    full = heads(hidden, prev)
    assert torch.equal(loaded(hidden, prev), full)
    proj = loaded.hidden_projections(hidden)
    for i in range(3):  # serving runs one head at a time, over the vocabulary only
        logits, token_ids = loaded.conditioned_candidates(i, proj[i], hidden, prev[i])
        assert torch.equal(token_ids, heads.vocab)
        torch.testing.assert_close(logits, full[i][:, heads.vocab], rtol=1e-5, atol=1e-5)


def test_the_token_before_changes_what_a_conditioned_head_drafts(model):
    heads = _trained_like(model, conditioned=True)
    hidden = torch.randn(1, 64).expand(2, 64)
    prev = torch.tensor([[5, 6], [5, 6], [5, 6]])
    out = heads(hidden, prev)
    assert not torch.allclose(out[:, 0], out[:, 1])  # same hidden state, other token before
    fresh = MedusaHeads.for_model(model, 3, conditioned=True)  # zero: the LM head itself
    torch.testing.assert_close(fresh(hidden, prev)[0], model.lm_head(hidden), rtol=1e-5,
                               atol=1e-5)


def test_conditioned_heads_refuse_to_run_without_their_tokens(model):
    heads = _trained_like(model, conditioned=True)
    with pytest.raises(ValueError, match="prev tokens"):
        heads(torch.randn(2, 64))
    with pytest.raises(ValueError, match="conditioned_candidates"):
        heads.candidates(torch.randn(2, 64))
    with pytest.raises(ValueError, match="not token-conditioned"):
        _trained_like(model).conditioned_candidates(0, torch.randn(2, 64), torch.randn(2, 64),
                                                    torch.tensor([1, 2]))
