"""The embedded default model (SmolLM2-135M-Instruct) through the engine, against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from baton.actors.engine import Engine
from baton.sampling import SamplingParams
from tests.conftest import hf_greedy

QUESTIONS = [
    "Why is the sky blue?", "Write a haiku about the sea.", "What is 17 times 3?",
    "Name a famous painter.", "How do bees make honey?", "Give me a synonym for happy.",
    "What is the capital of France? Answer in one word.", "Explain recursion to a child.",
    "List three fruits.", "What does a compiler do?", "Describe rain.", "Who wrote Hamlet?",
    "Translate 'good morning' into Spanish.", "What is photosynthesis?",
    "Tell me a joke about cats.", "Why do we sleep?",
]


def _chat(engine: Engine, q: str, pad: int = 0) -> list[int]:
    text = engine.apply_chat_template([{"role": "user", "content": q + " Please." * pad}])
    return engine.tokenizer.encode(text)


def test_single_request_matches_generate_bf16():
    # Prefix caching off: a cached prefix was computed in another GEMM shape, which in bf16
    # rounds differently (see the fp32 test below for identity under batching and caching).
    engine = Engine(num_threads=2, enable_prefix_caching=False)
    ref = AutoModelForCausalLM.from_pretrained(engine.source.path, dtype=torch.bfloat16)
    for q in QUESTIONS[:3]:
        ids = _chat(engine, q)
        out = engine.generate([ids], SamplingParams(max_tokens=48))[0]
        assert out.token_ids == hf_greedy(ref, ids, 48, stop_at_eos=True)


@pytest.mark.slow
def test_sixteen_concurrent_requests_match_generate_fp32():
    # float32: batched bf16 GEMMs round differently from batch-1 ones (in transformers too), so
    # token identity across batch shapes is a float32 property; the paging logic is what's tested.
    engine = Engine(dtype="float32", num_threads=2)
    ref = AutoModelForCausalLM.from_pretrained(engine.source.path, dtype=torch.float32)
    prompts = [_chat(engine, q, pad=i % 5 * 7) for i, q in enumerate(QUESTIONS)]
    assert len({len(p) for p in prompts}) > 8  # genuinely different lengths
    outs = engine.generate(prompts, SamplingParams(max_tokens=32))
    # Once more: now every prompt's system-prompt prefix comes from the cache.
    again = engine.generate(prompts[:4], SamplingParams(max_tokens=32))
    assert all(o.metrics.num_cached_tokens > 0 for o in again)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs[:4]]
    for ids, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(ref, ids, 32, stop_at_eos=True)


def test_generation_reads_as_an_answer(default_engine):
    ids = _chat(default_engine, "What is the capital of France? Answer in one word.")
    out = default_engine.generate([ids], SamplingParams(max_tokens=16))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its turn with EOS


def test_streaming_never_emits_broken_characters(default_engine):
    ids = _chat(default_engine, "Write the word hello in Chinese, Japanese and Greek, "
                                "and add some emoji.")
    outs = list(default_engine.stream(ids, SamplingParams(max_tokens=80)))
    deltas = [o.delta_text for o in outs]
    assert all("\ufffd" not in d for d in deltas)
    final = outs[-1]
    assert "".join(deltas) == final.text
    assert final.text == default_engine.tokenizer.decode(final.token_ids,
                                                         skip_special_tokens=True).rstrip("\ufffd")
    assert any(ord(ch) > 0x2E80 for ch in final.text)  # multi-byte characters did come through


def test_shared_system_prompt_hits_the_prefix_cache(default_engine):
    system = "You are a meticulous assistant. " * 12
    msgs = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
            for q in QUESTIONS[:4]]
    prompts = [default_engine.apply_chat_template(m) for m in msgs]
    before = default_engine.blocks.prefix_hits
    first = default_engine.generate(prompts[:1], SamplingParams(max_tokens=4))
    rest = default_engine.generate(prompts[1:], SamplingParams(max_tokens=4))
    hits = default_engine.blocks.prefix_hits - before
    shared = len(default_engine.tokenizer.encode(system)) // 16 * 16
    assert hits >= 3 * shared > 0
    assert all(o.metrics.num_cached_tokens >= shared for o in rest)
    assert first[0].metrics.num_cached_tokens < shared


def test_sampled_output_is_reproducible_with_a_seed(default_engine):
    ids = _chat(default_engine, "Tell me a story.")
    p = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, top_k=50, seed=11)
    a = default_engine.generate([ids], p)[0]
    b = default_engine.generate([ids], p)[0]
    assert a.token_ids == b.token_ids
