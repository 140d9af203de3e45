"""Pre-gating (Read-ME): a checkpoint from `baton moefy --pregate` is routed by one router for all
layers when Baton loads it, and the `pregate` offload policy loads every later layer's experts at
the first MoE layer, so only that layer's experts are ever missed in a decode step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import MixtralForCausalLM

from baton.actors.engine import Engine
from baton.actors.moe_offload import moe_layers
from baton.actors.pregate import CONFIG_KEY, Pregate, PregateRouter
from baton.actors.pregate_policy import PregatePolicy
from baton.errors import ConfigError, ModelLoadError
from baton.ops.bench.moe import policies_for
from baton.ops.moefy import MoefyOptions
from baton.ops.moefy_run import REPORT_FILE, run_moefy
from baton.sampling import SamplingParams
from tests.conftest import assert_no_leaks

FAST = dict(chunk_tokens=256, max_tokens=1024, greedy_tokens=8)
EXPERTS, TOP_K = 8, 2
PROMPTS = [list(b"def add(a, b):"), list(b"Hello, ")]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pregated") / "tiny-e8k2-pregate"
    run_moefy("tiny:llama", out, MoefyOptions(experts=EXPERTS, top_k=TOP_K, pregate=True,
                                              **FAST))
    return out


def _engine(model: Path, **options) -> Engine:
    return Engine(str(model), dtype="float32", methods=["none"], num_threads=1, **options)


def _one_at_a_time(engine: Engine) -> list[list[int]]:
    return [engine.generate([p], PARAMS)[0].token_ids for p in PROMPTS]


def test_every_layer_runs_the_experts_the_pregate_chose_at_the_first(checkpoint):
    report = json.loads((checkpoint / REPORT_FILE).read_text())
    assert report["pregate"] is True
    assert report["random_recall"] < report["router_recall"] <= report["oracle_recall"]
    # transformers alone loads the directory as a plain Mixtral (per-layer routers).
    plain = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert not any(isinstance(m, PregateRouter) for m in plain.modules())

    engine = _engine(checkpoint)
    layers = moe_layers(engine.model)
    assert len(layers) == plain.config.num_hidden_layers
    assert all(isinstance(layer.router, PregateRouter) for layer in layers)
    weight = layers[0].router.pregate.weight  # [L, E, H]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (MoE input, chosen experts) per layer
    hooks = [layer.experts.register_forward_pre_hook(
        lambda _m, args: seen.append((args[0].clone(), args[1].clone()))) for layer in layers]
    try:
        engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == 3 * len(layers)  # prefill and two decode steps
    for step in range(3):
        calls = seen[step * len(layers):(step + 1) * len(layers)]
        first = calls[0][0]
        for row, (_hidden, chosen) in enumerate(calls):
            want = (first @ weight[row].T).topk(TOP_K, dim=-1).indices
            assert torch.equal(chosen.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_pregate_policy_misses_only_at_the_first_layer_and_keeps_the_tokens(checkpoint, tier,
                                                                         tmp_path):
    want = _one_at_a_time(_engine(checkpoint))
    # A share of TOP_K slots per layer: one decode token's experts fit, so all of them are loaded
    # ahead except the first layer's.
    engine = _engine(checkpoint, moe_offload={
        "budget": TOP_K / EXPERTS, "policy": "pregate", "tier": tier,
        **({"dir": str(tmp_path)} if tier == "disk" else {})})
    moe = engine.moe
    assert moe is not None and type(moe.policy).__name__ == "PregatePolicy"
    first = moe.layers[0].index
    decode_misses: dict[int, int] = {}
    acquire = moe.cache.acquire
    tokens = [0]  # tokens in the forward in progress, seen at the first MoE layer

    def counting(layer: int, experts: list[int]) -> list[int]:
        before = moe.cache.stats.misses
        slots = acquire(layer, experts)
        if tokens[0] == 1:  # a decode step at batch 1
            decode_misses[layer] = decode_misses.get(layer, 0) + moe.cache.stats.misses - before
        return slots

    moe.cache.acquire = counting
    hook = moe.layers[0].experts.register_forward_pre_hook(
        lambda _m, args: tokens.__setitem__(0, args[0].shape[0]))
    try:
        got = _one_at_a_time(engine)
    finally:
        moe.cache.acquire = acquire
        hook.remove()
    assert got == want
    assert_no_leaks(engine)
    assert decode_misses[first] > 0  # the first layer's choice comes with its own input
    if tier == "disk" and moe.store.async_reads:
        # Reads start inside `prefetch`, so a planned expert is resident (or on its way) before
        # its layer asks; a host-tier copy runs on a thread that a tiny layer can outrun.
        assert {layer: n for layer, n in decode_misses.items() if layer != first and n} == {}
    stats = engine.expert_cache_stats()
    assert stats is not None and stats["prefetches_used"] > 0
    moe.close()


def test_pregate_plans_the_rest_of_the_forward_and_evicts_what_it_no_longer_uses():
    pregate = Pregate(torch.zeros(3, 8, 4), top_k=2)
    pregate.indices = torch.tensor([[[0, 1], [2, 3], [4, 5]]])  # one token: layer l runs these
    policy = PregatePolicy(pregate, [0, 1, 2], capacity=6)
    for key in [(0, 7), (1, 2), (2, 6), (1, 5), (2, 4)]:
        policy.insert(key)
    policy.route(0, pregate.indices[:, 0])
    hidden = torch.zeros(1, 4)
    assert policy.predict(0, hidden) == [(1, 2), (1, 3), (2, 4), (2, 5)]
    # Not used again in this forward: (0, 7), (1, 5), (2, 6); the latest layer's goes first.
    assert policy.victim([(0, 7), (1, 2), (2, 6), (1, 5), (2, 4)]) == (2, 6)
    assert policy.victim([(0, 7), (1, 2), (1, 5), (2, 4)]) == (1, 5)
    assert policy.victim([(1, 2), (2, 4)]) == (2, 4)  # both still to come: the furthest one
    policy.route(1, pregate.indices[:, 1])
    assert policy.predict(1, hidden) == [(2, 4), (2, 5)]
    assert policy.victim([(1, 2), (2, 4)]) == (2, 4)  # layer 1 ran: (1, 2) is still in use now
    # A cache too small for the whole plan gets a window: what fits beside this layer's own.
    small = PregatePolicy(pregate, [0, 1, 2], capacity=4)
    small.route(0, pregate.indices[:, 0])
    assert small.predict(0, hidden) == [(1, 2), (1, 3)]


def test_pregate_predicts_only_what_is_not_resident_at_the_head_of_its_plan():
    pregate = Pregate(torch.zeros(3, 8, 4), top_k=2)
    pregate.indices = torch.tensor([[[0, 1], [2, 3], [4, 5]]])
    policy = PregatePolicy(pregate, [0, 1, 2], capacity=6)
    policy.route(0, pregate.indices[:, 0])
    hidden = torch.zeros(1, 4)
    for key in [(0, 0), (0, 1), (1, 2), (1, 3)]:
        policy.insert(key)
    assert policy.predict(0, hidden) == [(2, 4), (2, 5)]
    policy.forget((1, 3))  # evicted before its layer ran: wanted again
    assert policy.predict(0, hidden) == [(1, 3), (2, 4), (2, 5)]
    for key in [(1, 3), (2, 4), (2, 5)]:
        policy.insert(key)
    assert policy.predict(1, hidden) == []  # the whole plan is in: nothing to look at


def test_pregate_beats_lru_on_hits_at_the_same_budget(checkpoint):
    def hit_rate(policy: str) -> float:
        engine = _engine(checkpoint, moe_offload={"budget": 0.25, "policy": policy})
        _one_at_a_time(engine)
        stats = engine.expert_cache_stats()
        assert stats is not None and engine.moe is not None
        engine.moe.close()
        return stats["hit_rate"]

    assert hit_rate("pregate") > hit_rate("lru")


def test_a_missing_pregate_file_fails_naming_the_config_key(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "pregate.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match=CONFIG_KEY):
        _engine(broken)


def test_the_bench_runs_pregate_only_where_the_model_has_one(checkpoint):
    assert "pregate" in policies_for(str(checkpoint), None)
    assert "pregate" not in policies_for("tiny:mixtral", None)
    with pytest.raises(ConfigError, match="unknown policies"):
        policies_for(str(checkpoint), ["mru"])
