"""The embedded default model (SmolLM2-135M-Instruct) through the engine, against transformers:
the same tokens in float32, float32's choices within rounding in bf16."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from baton.actors.engine import Engine
from baton.sampling import SamplingParams
from tests.conftest import hf_greedy, hf_greedy_batch

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


@pytest.fixture(scope="module")
def fp32() -> tuple[Engine, Any]:
    """The default model in float32 through the engine, and through transformers."""
    engine = Engine(dtype="float32", num_threads=2)
    return engine, AutoModelForCausalLM.from_pretrained(engine.source.path, dtype=torch.float32)


def test_single_requests_match_generate_fp32(fp32):
    # Identity across implementations is a float32 claim: bf16 GEMMs round differently from one
    # CPU to another (and from one batch shape to another).
    engine, ref = fp32
    for q, n in (("What is 17 times 3?", 48), ("Why is the sky blue?", 24)):
        ids = _chat(engine, q)
        out = engine.generate([ids], SamplingParams(max_tokens=n))[0]
        assert out.token_ids == hf_greedy(ref, ids, n, stop_at_eos=True)


def test_bf16_engine_follows_the_fp32_model(default_engine, fp32):
    """bf16 (the default) picks, at every step, the float32 model's choice from the same text or
    a near tie of it, with a log-probability close to float32's: rounding, never a wrong path."""
    _, ref = fp32
    for q, n in (("What is 17 times 3?", 48), ("Why is the sky blue?", 24)):
        ids = _chat(default_engine, q)
        out = default_engine.generate([ids], SamplingParams(max_tokens=n, logprobs=0))[0]
        assert out.logprobs is not None
        with torch.inference_mode():  # float32's view of the text bf16 produced
            logits = ref(torch.tensor([ids + out.token_ids])).logits[0, len(ids) - 1 : -1]
        fp32_lp = logits.float().log_softmax(-1)
        chosen = fp32_lp[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
        assert (fp32_lp.max(-1).values - chosen).max().item() < 0.5
        bf16_lp = torch.tensor([lp.logprob for lp in out.logprobs])
        assert (bf16_lp - chosen).abs().max().item() < 0.5


@pytest.mark.slow
def test_sixteen_concurrent_requests_match_generate_fp32(fp32):
    # float32: batched bf16 GEMMs round differently from batch-1 ones (in transformers too), so
    # token identity across batch shapes is a float32 property; the paging logic is what's tested.
    engine, ref = fp32
    prompts = [_chat(engine, q, pad=i % 5 * 7) for i, q in enumerate(QUESTIONS)]
    assert len({len(p) for p in prompts}) > 8  # genuinely different lengths
    outs = engine.generate(prompts, SamplingParams(max_tokens=20))
    # Once more: now every prompt's system-prompt prefix comes from the cache.
    again = engine.generate(prompts[:4], SamplingParams(max_tokens=20))
    assert all(o.metrics.num_cached_tokens > 0 for o in again)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs[:4]]
    assert [o.token_ids for o in outs] == hf_greedy_batch(ref, prompts, 20)


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


def test_sampled_output_is_reproducible_with_a_seed(fp32):
    """A seeded request sent twice gives the same text: in bf16 when both runs take the same
    path (here with the prefix cache off), and in float32 also when the second run hits the
    prefix cache. (In bf16 that hit recomputes the prompt's last token alone, through the decode
    step's kernels rather than the prompt's, and rounding may then change a sample.)"""
    p = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, top_k=50, seed=11)
    bf16 = Engine(dtype="bfloat16", num_threads=2, enable_prefix_caching=False)
    for engine in (bf16, fp32[0]):
        ids = _chat(engine, "Tell me a story.")
        a = engine.generate([ids], p)[0]
        b = engine.generate([ids], p)[0]
        assert a.token_ids == b.token_ids
    assert b.metrics.num_cached_tokens > 0  # float32's second run came from the prefix cache
