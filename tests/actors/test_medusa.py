"""Medusa heads: fresh heads are the LM head, saved heads come back on the model they fit (and a
clear error on one they do not), and the candidate tree keeps the likeliest paths."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from baton.actors.medusa import CONFIG_FILE, WEIGHTS_FILE, MedusaHeads, propose_tree
from baton.actors.tiny import tiny_config, tiny_model
from baton.errors import ConfigError, ModelLoadError


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _trained_like(model, num_heads: int = 3, seed: int = 0) -> MedusaHeads:
    """Heads with random (non-zero) weights, as if trained."""
    heads = MedusaHeads.for_model(model, num_heads, base_model="tiny:llama")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=gen) * 0.3)
        heads.bias.copy_(torch.randn(heads.bias.shape, generator=gen) * 0.3)
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
    # Serving's folded (and, where oneDNN can, packed) heads: the same logits up to bf16 rounding.
    logits, _ = loaded.candidates(hidden)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), loaded(hidden).float(), rtol=0.05, atol=0.05)


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


# -- propose_tree ----------------------------------------------------------------------------------


def _logits(num_heads: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(num_heads, vocab, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_nodes, top_k", [(1, 3), (6, 3), (20, 4), (64, 10)])
def test_tree_keeps_the_likeliest_paths(seed, max_nodes, top_k):
    num_heads = 3
    logits = _logits(num_heads, 50, seed)
    tree, scores = propose_tree(logits, max_nodes=max_nodes, top_k=top_k)

    probs = logits.softmax(-1)
    top = probs.topk(top_k, dim=-1)
    every = {}  # path of tokens -> product of head probabilities
    for depth in range(1, num_heads + 1):
        for ranks in itertools.product(range(top_k), repeat=depth):
            path = tuple(top.indices[d, r].item() for d, r in enumerate(ranks))
            every[path] = float(torch.tensor([top.values[d, r] for d, r in enumerate(ranks)]
                                             ).prod())
    best = sorted(every, key=every.__getitem__, reverse=True)[: min(max_nodes, len(every))]

    paths = []
    for i in range(len(tree)):
        path, node = [], i
        while node >= 0:
            path.append(tree.tokens[node])
            node = tree.parents[node]
        paths.append(tuple(reversed(path)))
    assert len(tree) == min(max_nodes, len(every))
    assert set(paths) == set(best)
    assert max(tree.depths()) <= num_heads
    # Each node's score is its path's probability, best first: every prefix is a tree whose
    # expected accepted length is the sum of its scores.
    assert scores == pytest.approx([every[p] for p in paths], rel=1e-5)
    assert scores == sorted(scores, reverse=True)
    for n in range(len(tree) + 1):
        prefix = tree.prefix(n)
        assert prefix.tokens == tree.tokens[:n] and prefix.parents == tree.parents[:n]


def test_tree_with_one_candidate_per_head_is_the_chain_of_argmaxes():
    logits = _logits(4, 50, 0)
    tree, _ = propose_tree(logits, max_nodes=10, top_k=1)
    assert tree.is_chain
    assert tree.tokens == logits.argmax(-1).tolist()
    assert propose_tree(logits, max_nodes=2, top_k=1)[0].tokens == logits.argmax(-1)[:2].tolist()


def test_tree_over_a_vocabulary_subset_names_the_real_tokens():
    logits = _logits(3, 5, 0)
    token_ids = torch.tensor([4, 40, 41, 90, 200])
    tree, _ = propose_tree(logits, max_nodes=3, top_k=1, token_ids=token_ids)
    assert tree.tokens == token_ids[logits.argmax(-1)].tolist()


def test_tree_without_room_is_empty_and_bad_input_is_refused():
    assert len(propose_tree(_logits(2, 10, 0), max_nodes=0, top_k=2)[0]) == 0
    with pytest.raises(ValueError):
        propose_tree(torch.zeros(10), max_nodes=4, top_k=2)
    with pytest.raises(ValueError):
        propose_tree(torch.zeros(2, 10), max_nodes=4, top_k=0)
