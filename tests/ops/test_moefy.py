"""`baton moefy`: a dense model split into experts computes the dense model when every expert runs,
its top-k checkpoint loads as Mixtral with routers that beat chance, the engine serves it with
expert offload exactly as without, and inputs that cannot be split fail saying what to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MixtralForCausalLM
from typer.testing import CliRunner

from baton.actors.engine import Engine
from baton.actors.tiny import tiny_tokenizer
from baton.errors import ConfigError, ModelLoadError
from baton.ops.cli import app
from baton.ops.moefy import MoefyOptions, build_moe, load_dense, moefy, text_chunks
from baton.ops.moefy_run import REPORT_FILE, run_moefy
from baton.sampling import SamplingParams

# Small calibration and evaluation, so the file runs in seconds on the tiny byte-level model.
FAST = dict(chunk_tokens=256, max_tokens=1024, greedy_tokens=8)
EXPERTS, TOP_K = 8, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls gain nothing from two, and lose much on a loaded box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense():
    return load_dense("tiny:llama")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moefied") / "tiny-e8k2"
    run_moefy("tiny:llama", out, MoefyOptions(experts=EXPERTS, top_k=TOP_K, **FAST))
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids[None]).logits[0]


def test_all_experts_together_compute_the_dense_model(dense):
    options = MoefyOptions(experts=4, top_k=4, **FAST)
    result = moefy(dense, options)
    ids = text_chunks(dense, heldout=True, options=options)[0]
    want = _logits(dense.model, ids)
    # The experts really are a reordering: each holds neurons from all over the dense MLP.
    assert not torch.equal(result.split.groups[0].flatten(), torch.arange(128))
    torch.testing.assert_close(_logits(result.moe, ids), want, atol=1e-2, rtol=1e-3)

    # A gate/up permutation that does not match the down projection's breaks it.
    split = result.split
    split.groups[1] = split.groups[1].roll(1, dims=1)
    broken = build_moe(dense.model, split, options)
    state = broken.state_dict()
    state["model.layers.1.mlp.experts.down_proj"] = result.moe.state_dict()[
        "model.layers.1.mlp.experts.down_proj"]
    broken.load_state_dict(state)
    assert (_logits(broken, ids) - want).abs().max() > 0.1


def test_topk_checkpoint_loads_as_mixtral_and_routes_better_than_chance(checkpoint):
    model = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert model.config.num_local_experts == EXPERTS
    assert model.config.num_experts_per_tok == TOP_K
    assert model.config.intermediate_size == 128 // EXPERTS
    report = json.loads((checkpoint / REPORT_FILE).read_text())
    assert report["experts"] == EXPERTS and report["top_k"] == TOP_K
    assert report["heldout_tokens"] > 500
    for name in ("dense_perplexity", "moe_perplexity"):
        assert report[name] > 1
    for name in ("top1_agreement", "greedy_prefix_agreement", "greedy_position_agreement"):
        assert 0 <= report[name] <= 1
    # A random choice of k groups gets k/E of each token's group mass on average.
    assert report["router_recall"] > TOP_K / EXPERTS + 0.05
    assert report["router_recall"] <= report["oracle_recall"]
    assert len(report["router_recall_per_layer"]) == model.config.num_hidden_layers


def _greedy(engine: Engine) -> list[list[int]]:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in (list(b"def add(a, b):"), list(b"Hello, "))]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[i] for i in ids]


def test_engine_serves_the_checkpoint_with_expert_offload(checkpoint, tmp_path):
    def engine(**options) -> Engine:
        return Engine(str(checkpoint), dtype="float32", methods=["none"], num_threads=1,
                      **options)

    want = _greedy(engine())
    offloaded = engine(moe_offload={"budget": 0.25, "policy": "lru", "tier": "disk",
                                    "dir": str(tmp_path)})
    assert offloaded.moe is not None
    assert _greedy(offloaded) == want


def test_bad_inputs_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="--top-k"):
        MoefyOptions(experts=4, top_k=5)
    with pytest.raises(ConfigError, match="does not divide the intermediate size 128"):
        run_moefy("tiny:llama", tmp_path / "a", MoefyOptions(experts=3, top_k=1))
    with pytest.raises(ModelLoadError, match="already a Mixture-of-Experts"):
        run_moefy("tiny:mixtral", tmp_path / "b", MoefyOptions(experts=4, top_k=1))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    with pytest.raises(ModelLoadError, match="no gated SiLU MLP"):
        run_moefy(str(gpt2), tmp_path / "c", MoefyOptions(experts=4, top_k=1))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        run_moefy("tiny:llama", tmp_path / "d", MoefyOptions(experts=4, top_k=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_cli_refuses_more_experts_per_token_than_experts(tmp_path):
    result = CliRunner().invoke(app, ["moefy", "--model", "tiny:llama", "--experts", "4",
                                      "--top-k", "5", "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, ConfigError)
    assert "--top-k" in result.exception.message
    assert not (tmp_path / "out").exists()
