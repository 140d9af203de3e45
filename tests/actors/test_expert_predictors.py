"""Predictive expert prefetch: trace similarity learns routing that repeats, the learned
routing-path predictor beats chance on held-out text, `baton train-experts` writes a file the
engine serves with, and a predictor for another model shape is refused naming the option."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from baton.actors.engine import Engine
from baton.actors.expert_cache import ExpertCache
from baton.actors.expert_policies import ExpertPolicy, LRUPolicy
from baton.actors.expert_store import HostStore
from baton.actors.routing_predictor import ModelShape, RoutingPredictor
from baton.actors.trace_policy import TracePolicy
from baton.engine_config import EngineConfig
from baton.errors import ConfigError
from baton.ops.cli import app
from baton.ops.expert_traces import train_experts
from baton.sampling import SamplingParams
from tests.conftest import wait_until

LAYERS, EXPERTS, TOP_K = 3, 8, 2


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _idle(cache: ExpertCache) -> bool:
    with cache._cond:
        return not cache._queue and all(load is None or load.issued.is_set()
                                        for load in cache._load)


def _run_steps(policy: ExpertPolicy, steps: list[list[list[int]]], capacity: int) -> dict:
    """Drive an expert cache through forward steps (per step, per layer: the experts its one
    token chose) the way the offload forward does; each layer's prefetch lands before the next
    layer runs. Returns the cache's counters."""
    gen = torch.Generator().manual_seed(0)
    store_layers = {layer: (torch.randn(EXPERTS, 4, 3, generator=gen),
                            torch.randn(EXPERTS, 3, 2, generator=gen)) for layer in range(LAYERS)}
    cache = ExpertCache(HostStore(store_layers, pin=False), capacity, torch.device("cpu"), policy)
    hidden = torch.zeros(1, 3)
    try:
        for step in steps:
            for layer, experts in enumerate(step):
                policy.route(layer, torch.tensor([experts]))
                predicted = policy.predict(layer, hidden)
                slots = cache.acquire(layer, experts)
                cache.prefetch(predicted)
                cache.release(slots)
                wait_until(lambda: _idle(cache), what="the prefetches to land")
        return cache.snapshot()
    finally:
        cache.close()


def _repeating_steps(patterns: int, steps: int) -> list[list[list[int]]]:
    """Steps cycling through `patterns` routings; each pattern starts with its own layer-0
    experts, and picks its later layers' experts at random."""
    rng = random.Random(0)
    routings = [[[2 * p, 2 * p + 1]] + [sorted(rng.sample(range(EXPERTS), TOP_K))
                                         for _ in range(LAYERS - 1)] for p in range(patterns)]
    return [routings[i % patterns] for i in range(steps)]


def test_trace_prefetches_become_used_when_routing_repeats():
    steps = _repeating_steps(patterns=3, steps=30)
    capacity = LAYERS * TOP_K  # one step's experts: LRU alone cannot keep three patterns
    trace = _run_steps(TracePolicy(list(range(LAYERS)), EXPERTS, TOP_K, capacity), steps,
                       capacity)
    lru = _run_steps(LRUPolicy(), steps, capacity)
    assert trace["prefetches_issued"] > 0
    assert trace["prefetch_precision"] > 0.8
    assert trace["prefetch_recall"] > 0.4  # most of layers 1 and 2 came in ahead
    assert trace["hit_rate"] > lru["hit_rate"] + 0.3


def test_trace_tells_apart_requests_whose_tokens_start_alike_by_their_history():
    # Two kinds of request whose tokens choose the same first-layer experts and differ after.
    kinds = {"a": [[0, 1], [2, 3], [4, 5]], "b": [[0, 1], [6, 7], [2, 5]]}
    policy = TracePolicy(list(range(LAYERS)), EXPERTS, TOP_K, capacity=LAYERS * EXPERTS)

    def step(requests: list[tuple[str, str]]) -> list[set[tuple[int, int]]]:
        """One forward of one token per request; what each layer's prediction named."""
        policy.begin_step([(rid, 1) for rid, _ in requests])
        named = []
        for layer in range(LAYERS):
            policy.route(layer, torch.tensor([kinds[kind][layer] for _, kind in requests]))
            named.append(set(policy.predict(layer, torch.zeros(len(requests), 3))))
        return named

    for i in range(3):  # requests of both kinds, batched together, fill the library
        for _ in range(4):
            step([(f"a{i}", "a"), (f"b{i}", "b")])
        policy.end_request(f"a{i}")
        policy.end_request(f"b{i}")
    for kind, other in (("a", "b"), ("b", "a")):
        step([(f"new-{kind}", kind)])  # its first step gives it a history
        named = step([(f"new-{kind}", kind)])[0]  # at the first layer of its second step
        want = {(1, e) for e in kinds[kind][1]}
        assert want <= named
        assert len(named & {(1, e) for e in kinds[other][1]}) <= 1
        policy.end_request(f"new-{kind}")


def test_the_engine_tells_the_trace_policy_which_requests_ran_and_ended():
    engine = Engine("tiny:mixtral", dtype="float32", methods=["none"], num_threads=1,
                    moe_offload={"budget": 0.5, "policy": "trace"})
    assert engine.moe is not None and isinstance(engine.moe.policy, TracePolicy)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in (list(b"The quick brown fox"), list(b"MoE!"))]
    engine.step()  # both prompts
    engine.step()  # both first decode tokens: the prompts' steps are filed, with histories
    assert engine.moe.policy.histories == len(ids)
    while engine.has_unfinished():
        engine.step()
    engine.generate([list(b"jumps over")], params)  # its steps file the others' last ones
    assert engine.moe.policy.histories == 0  # ended requests keep none
    assert engine.moe.policy.traces > 2 * params.max_tokens
    engine.moe.close()


def test_train_experts_writes_a_predictor_that_beats_chance_and_the_engine_serves(tmp_path):
    out = tmp_path / "mixtral.safetensors"
    result = CliRunner().invoke(app, ["train-experts", "--model", "tiny:mixtral", "--out",
                                      str(out), "--tokens", "1200", "--max-tokens", "8",
                                      "--dtype", "float32", "--threads", "1", "--output", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tokens"] == {"train": 960, "heldout": 240}
    layers = report["layers"]
    assert [s["layer"] for s in layers] == [1, 2]
    for score in layers:  # held-out prompts: text the fit never saw
        assert score["chance"] == TOP_K / EXPERTS
        assert score["recall_at_k"] > 1.5 * score["chance"]
        assert score["recall_at_k"] > score["popular_recall_at_k"]
    engine = Engine("tiny:mixtral", dtype="float32", methods=["none"], num_threads=1,
                    moe_offload={"budget": 0.5, "policy": "learned", "predictor": str(out)})
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine.generate([list(b"The quick brown fox jumps over the lazy dog."), list(b"MoE!")],
                    params)
    stats = engine.expert_cache_stats()
    assert stats is not None and stats["policy"] == "LearnedPolicy"
    assert stats["prefetches_issued"] > 0 and stats["prefetch_precision"] > 0.3
    assert engine.moe is not None
    engine.moe.close()


def test_trace_policy_serves_the_engine_and_its_prefetches_get_used():
    engine = Engine("tiny:mixtral", dtype="float32", methods=["none"], num_threads=1,
                    moe_offload={"budget": 0.5, "policy": "trace"})
    prompt = list(b"The quick brown fox jumps over the lazy dog. ")
    engine.generate([prompt * 2], SamplingParams(max_tokens=16, ignore_eos=True))
    stats = engine.expert_cache_stats()
    assert stats is not None and stats["policy"] == "TracePolicy"
    assert stats["prefetches_issued"] > 0 and stats["prefetches_used"] > 0
    assert engine.moe is not None
    engine.moe.close()


def test_a_predictor_for_another_model_shape_is_refused_naming_the_option(tmp_path):
    path = tmp_path / "other.safetensors"
    other = ModelShape(moe_layers=(0, 1), num_experts=EXPERTS, top_k=TOP_K, hidden_size=64)
    RoutingPredictor(other, torch.zeros(1, 65, EXPERTS), "other-model").save(path)
    with pytest.raises(ConfigError, match=r"moe_offload\.predictor .*other-model.*MoE layers "
                                          r"\[0, 1\].*has MoE layers \[0, 1, 2\]"):
        Engine("tiny:mixtral", dtype="float32", methods=["none"], num_threads=1,
               moe_offload={"budget": 0.5, "policy": "learned", "predictor": str(path)})
    # A file of the older kind (one map from the first MoE layer to all later ones): retrain.
    older = tmp_path / "older.safetensors"
    RoutingPredictor(other, torch.zeros(65, EXPERTS), "other-model").save(older)
    with pytest.raises(ConfigError, match=r"moe_offload\.predictor .*older kind.*train-experts"):
        Engine("tiny:mixtral", dtype="float32", methods=["none"], num_threads=1,
               moe_offload={"budget": 0.5, "policy": "learned", "predictor": str(older)})
    not_a_predictor = tmp_path / "notes.safetensors"
    not_a_predictor.write_text("hello")
    with pytest.raises(ConfigError, match=r"moe_offload\.predictor .* not a routing predictor"):
        Engine("tiny:mixtral", dtype="float32", methods=["none"], num_threads=1,
               moe_offload={"budget": 0.5, "policy": "learned",
                            "predictor": str(not_a_predictor)})


@pytest.mark.parametrize(("offload", "says"), [
    ({"policy": "learned"}, "needs predictor"),
    ({"policy": "trace", "predictor": "p.safetensors"}, "read by policy 'learned' only"),
])
def test_predictor_options_are_checked_when_the_config_is_read(offload, says):
    # No model loads here: a cluster config with this mistake fails before any actor starts.
    with pytest.raises(ConfigError, match=rf"moe_offload\.predictor: .*{says}"):
        EngineConfig.from_options(model="tiny:mixtral", moe_offload={"budget": 0.5, **offload})


def test_train_experts_on_a_dense_model_says_it_needs_moe_layers(tmp_path):
    out = tmp_path / "dense.safetensors"
    with pytest.raises(ConfigError, match=r"--model tiny:llama has 0 Mixture-of-Experts layers"):
        train_experts("tiny:llama", out, tokens=100, dtype="float32", threads=1)
    assert not out.exists()
