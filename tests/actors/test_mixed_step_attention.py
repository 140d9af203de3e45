"""A step that mixes prompt chunks with decoding requests attends row by row, unpadded, and gives
each request what it gets alone (float32: the same tokens, logprobs to rounding)."""

from __future__ import annotations

import pytest
import torch

from baton.actors import paged_attention
from baton.actors.engine import Engine
from baton.sampling import SamplingParams

PROMPTS = [list(range(3, 83)), [7, 5, 3] * 9, list(range(200, 235))]


def _alone(prompt: list[int], params: SamplingParams):
    (out,) = Engine("tiny:llama", dtype="float32", max_num_batched_tokens=48).generate(
        [prompt], params)
    return out


def test_a_mixed_step_gives_each_request_what_it_gets_alone(monkeypatch) -> None:
    calls = []
    ragged = paged_attention._ragged_attention
    monkeypatch.setattr(paged_attention, "_ragged_attention",
                        lambda *a: calls.append(a[0]) or ragged(*a))
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2)
    # A 48-token budget: the 80-token prompt runs in two chunks, the second (its cached first
    # chunk before it) beside the others' whole prompts, then their decodes beside its own.
    engine = Engine("tiny:llama", dtype="float32", max_num_batched_tokens=48)
    engine.add_request(PROMPTS[0], params, request_id="0")
    engine.step()
    for i, prompt in enumerate(PROMPTS[1:], start=1):
        engine.add_request(prompt, params, request_id=str(i))
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
    # The ragged path ran, with a chunk after cached tokens and decoding rows beside it.
    assert any(p.groups and p.runs for p in calls)
    assert any(run.ctx > run.n for p in calls for run in p.runs)
    for i, prompt in enumerate(PROMPTS):
        ref = _alone(prompt, params)
        assert done[i].token_ids == ref.token_ids
        for got, want in zip(done[i].logprobs, ref.logprobs, strict=True):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)


def test_decoding_rows_of_far_apart_contexts_attend_in_groups(monkeypatch) -> None:
    calls = []
    ragged = paged_attention._ragged_attention
    monkeypatch.setattr(paged_attention, "_ragged_attention",
                        lambda *a: calls.append(a[0]) or ragged(*a))
    prompts = [[3 + i % 250 for i in range(600)], [9, 8, 7, 6], list(range(40, 60))]
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2)
    outs = Engine("tiny:llama", dtype="float32", max_num_batched_tokens=1024).generate(
        prompts, params)
    # Decode steps: the 600-token row apart from the two short ones, which share a group.
    decode = [p for p in calls if not p.runs]
    assert decode and all(sorted(len(g.rows) for g in p.groups) == [1, 2] for p in decode)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = _alone(prompt, params)
        assert out.token_ids == ref.token_ids
        for got, want in zip(out.logprobs, ref.logprobs, strict=True):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)


def test_draft_trees_beside_other_rows_are_verified_in_groups(monkeypatch, tmp_path) -> None:
    """Medusa trees in a batch join the decode groups under their ancestor masks (padded to the
    group's longest draft): the same tokens and logprobs as decoding one token at a time."""
    from baton.actors.medusa import MedusaHeads

    calls = []
    ragged = paged_attention._ragged_attention
    monkeypatch.setattr(paged_attention, "_ragged_attention",
                        lambda *a: calls.append(a[:2]) or ragged(*a))
    MedusaHeads.for_model(Engine("tiny:llama", dtype="float32").model, 3).save(tmp_path)
    engine = Engine("tiny:llama", dtype="float32", methods=["medusa"], medusa_heads=str(tmp_path))
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2, method="medusa",
                            num_speculative_tokens=6)
    outs = engine.generate(PROMPTS, params)
    # Some step verified trees together: a group row whose own block is not causal (a node does
    # not see its siblings).
    blocks = []
    for plan, batch in calls:
        for group in plan.groups:
            if group.real is None:
                continue
            counts = group.real.view(group.queries.shape).sum(1).tolist()
            for i, (row, n) in enumerate(zip(group.rows.tolist(), counts, strict=True)):
                ctx = int(batch.context_lens[row])
                blocks.append(group.mask[i, :n, ctx - n : ctx])
    assert any(not m.equal(torch.ones_like(m).tril()) for m in blocks)
    plain = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = _alone(prompt, plain)
        assert out.token_ids == ref.token_ids
        for got, want in zip(out.logprobs, ref.logprobs, strict=True):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
