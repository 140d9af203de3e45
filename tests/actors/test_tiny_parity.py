"""Greedy output through Baton's paged cache equals transformers `generate` on several
architectures (tiny random weights, float32), alone, concurrently, chunked and preempted."""

from __future__ import annotations

import random

import pytest

from baton.actors.engine import Engine
from baton.actors.tiny import MOE_ARCHS, TINY_CONFIGS, tiny_model
from baton.outputs import RequestOutput
from baton.sampling import SamplingParams
from tests.conftest import assert_no_leaks, hf_greedy

ARCHS = sorted(TINY_CONFIGS)


def _workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(256) for _ in range(rng.choice([1, 3, 15, 16, 17, 40, 90]))],
         rng.choice([1, 5, 20, 33]))
        for _ in range(n)
    ]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(arch):
    return tiny_model(arch)


@pytest.fixture(scope="module")
def references(reference):
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def get(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            cache[key] = hf_greedy(reference, prompt, n, stop_at_eos=False)
        return cache[key]

    return get


def _finals(engine: Engine, work) -> list[RequestOutput]:
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in work]
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert out.finish_reason == "length"
                done[out.request_id] = out
    assert_no_leaks(engine)
    return [done[i] for i in ids]


def _run(engine: Engine, work) -> list[list[int]]:
    return [o.token_ids for o in _finals(engine, work)]


def _dense_only(arch: str) -> None:
    """Chunking, preemption and prefix reuse live in the paged cache, not the MLP: the MoE
    models run the two tests above (and tests/actors/test_moe_offload.py), not these."""
    if arch in MOE_ARCHS:
        pytest.skip("cache mechanics: checked on the dense architectures")


def test_single_request_matches_generate(arch, references):
    engine = Engine(f"tiny:{arch}", dtype="float32")
    prompt, n = [5, 17, 99, 3, 250, 8, 8, 8, 41], 40
    assert _run(engine, [(prompt, n)]) == [references(prompt, n)]


def test_sixteen_concurrent_requests_match_generate(arch, references):
    engine = Engine(f"tiny:{arch}", dtype="float32")
    work = _workload(16)
    assert _run(engine, work) == [references(p, n) for p, n in work]


def test_chunked_prefill_matches_generate(arch, references):
    _dense_only(arch)
    # A budget of 8 tokens per step splits every long prompt into chunks, mixed with decodes.
    engine = Engine(f"tiny:{arch}", dtype="float32", max_num_batched_tokens=8)
    work = _workload(6, seed=1)
    assert _run(engine, work) == [references(p, n) for p, n in work]


def test_preemption_recomputes_without_changing_output(arch, references):
    _dense_only(arch)
    # 12 blocks of 16 tokens cannot hold all of these at once: requests get preempted.
    engine = Engine(f"tiny:{arch}", dtype="float32", num_kv_blocks=12, block_size=16)
    rng = random.Random(2)
    work = [([rng.randrange(256) for _ in range(30)], 60) for _ in range(5)]
    outs = _finals(engine, work)
    assert [o.token_ids for o in outs] == [references(p, n) for p, n in work]
    assert sum(o.metrics.num_preemptions for o in outs) > 0


def test_shared_prefix_reuses_blocks_and_keeps_output(arch, references):
    _dense_only(arch)
    engine = Engine(f"tiny:{arch}", dtype="float32", block_size=4)
    prefix = list(range(40, 80))
    work = [(prefix + [i, i + 1], 10) for i in range(4)]
    first = _run(engine, work[:1])
    rest = _run(engine, work[1:])
    assert first + rest == [references(p, n) for p, n in work]
    # 40 shared tokens = 10 blocks of 4, hit by each of the three later requests.
    assert engine.blocks.prefix_hits == 3 * 40
    assert engine.blocks.prefix_queries == 4 * 41  # all prompt tokens but the last
    assert engine.blocks.prefix_hit_rate == pytest.approx(120 / 164)
