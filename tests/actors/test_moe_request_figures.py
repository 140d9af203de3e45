"""What a request and a step report of the expert cache: a request on an offloaded MoE model
carries the loads and stalls of the steps it ran in (so the router can write them into the
performance history); a request on a dense model carries none."""

from __future__ import annotations

import pytest
import torch

from baton.actors.engine import Engine
from baton.outputs import ExpertCacheUse, RequestOutput, StepStats
from baton.records import ExpertCacheStatus
from baton.sampling import SamplingParams

PROMPT = list(b"The quick brown fox jumps over the lazy dog.")
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _engine(model: str, **options) -> Engine:
    return Engine(model, dtype="float32", methods=["none"], num_threads=1, **options)


def _run(engine: Engine, prompts: list[list[int]]) -> tuple[list[RequestOutput], list[StepStats]]:
    """The final outputs of `prompts` (run as one batch) and the stats of every step."""
    ids = [engine.add_request(p, PARAMS) for p in prompts]
    done: dict[str, RequestOutput] = {}
    steps = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        assert engine.last_step is not None
        steps.append(engine.last_step)
    return [done[i] for i in ids], steps


def _same(got: ExpertCacheUse | None, want: ExpertCacheUse) -> bool:
    """Equal counts; stall seconds equal up to the rounding of summing them step by step."""
    return got is not None and (got.hits, got.misses, got.bytes_loaded) == (
        want.hits, want.misses, want.bytes_loaded) and got.stall_seconds == pytest.approx(
        want.stall_seconds)


def test_a_request_on_offloaded_experts_carries_the_loads_of_its_steps():
    engine = _engine("tiny:mixtral", moe_offload={"budget": 0.1, "policy": "lru"})
    assert engine.moe is not None
    before = engine.moe.use()
    (out,), steps = _run(engine, [PROMPT])
    got = out.metrics.expert_cache
    assert got is not None
    assert got.misses > 0 and got.bytes_loaded > 0  # a tenth of the experts: it had to load
    assert got.stall_seconds > 0
    # Alone in the engine, it ran in every step: its figures are the cache's whole change, and
    # the steps' own figures add up to the same.
    assert _same(got, engine.moe.use() - before)
    total = sum((s.expert_cache for s in steps if s.expert_cache is not None), ExpertCacheUse())
    assert total == got
    assert all(s.expert_cache is not None and s.num_seqs == 1 for s in steps)

    # What a worker's info() carries of this engine is what status and heartbeats report.
    now = engine.moe.use()
    shown = ExpertCacheStatus.from_info({"expert_cache": engine.expert_cache_stats()})
    assert shown is not None
    assert (shown.hits, shown.misses, shown.bytes_loaded, shown.stall_seconds) == (
        now.hits, now.misses, now.bytes_loaded, now.stall_seconds)
    assert shown.hit_rate == now.hits / (now.hits + now.misses)

    # Two requests batched together ran in the same steps: each is charged each step in full.
    before = engine.moe.use()
    (a, b), _ = _run(engine, [PROMPT, list(b"MoE!")])
    assert a.metrics.expert_cache == b.metrics.expert_cache
    assert _same(a.metrics.expert_cache, engine.moe.use() - before)
    engine.moe.close()


def test_a_request_on_a_dense_model_carries_no_expert_figures():
    engine = _engine("tiny:llama")
    (out,), steps = _run(engine, [PROMPT])
    assert out.metrics.expert_cache is None
    assert ExpertCacheStatus.from_info({"expert_cache": engine.expert_cache_stats()}) is None
    assert steps and all(s.expert_cache is None and s.num_tokens > 0 for s in steps)
