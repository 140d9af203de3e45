"""Speculative methods are lossless: greedy tokens equal `none`'s for every method, alone and
mixed in one batch, through chunked prefill, preemption, prefix-cache hits, stop strings inside an
accepted draft and max_tokens reached mid-draft; rejected drafts leave no KV behind."""

from __future__ import annotations

import random

import pytest
import torch

from baton.actors.draft_tree import DraftTree
from baton.actors.engine import Engine
from baton.actors.medusa import MedusaHeads
from baton.errors import ConfigError, InvalidRequestError
from baton.sampling import SamplingParams
from tests.conftest import assert_no_leaks, run_to_completion

METHODS = ["ngram", "lookahead", "layerskip", "draft"]


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Byte prompts, some repetitive (prompt lookup hits), some random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            unit = [rng.randrange(256) for _ in range(rng.choice([3, 5, 8]))]
            out.append((unit * 12)[: rng.choice([20, 40, 70])])
        else:
            out.append([rng.randrange(256) for _ in range(rng.choice([5, 17, 33]))])
    return out


@pytest.fixture(scope="module")
def engine() -> Engine:
    # The draft is the target itself: every draft token is right, so long drafts get accepted
    # and the paths that only accepted tokens reach (stop strings, max_tokens) are exercised.
    return Engine("tiny:llama", dtype="float32", draft_model="tiny:llama",
                  methods=METHODS, block_size=8)


@pytest.fixture(scope="module")
def reference(engine) -> dict[tuple[int, ...], list[int]]:
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    prompts = _prompts(12)
    outs = engine.generate(prompts, params)
    return {tuple(p): o.token_ids for p, o in zip(prompts, outs, strict=True)}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gives_the_greedy_tokens_of_none(engine, reference, method):
    params = SamplingParams(max_tokens=48, ignore_eos=True, method=method,
                            num_speculative_tokens=4)
    prompts = [list(p) for p in reference]
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == list(reference.values())
    drafted = sum(o.metrics.spec_draft_tokens for o in outs)
    accepted = sum(o.metrics.spec_accepted_tokens for o in outs)
    assert drafted > 0, "nothing was drafted: the method never ran"
    if method == "draft":  # the target as its own draft: everything is accepted
        assert accepted == drafted
        assert all(o.metrics.num_forward_passes < 48 for o in outs)
    assert_no_leaks(engine)


def test_methods_mixed_in_one_batch_chunked_and_preempted(reference):
    # Few blocks and a small token budget: prompts are chunked and requests preempted.
    small = Engine("tiny:llama", dtype="float32", draft_model="tiny:llama",
                   methods=METHODS, block_size=8, num_kv_blocks=40, max_num_batched_tokens=24)
    rids = {}
    for i, prompt in enumerate(reference):
        method = ["none", *METHODS][i % 4]
        params = SamplingParams(max_tokens=48, ignore_eos=True, method=method,
                                num_speculative_tokens=3 + i % 3)
        rids[small.add_request(list(prompt), params)] = prompt
    outs = run_to_completion(small)
    assert sum(o.metrics.num_preemptions for o in outs.values()) > 0
    assert sum(o.metrics.spec_accepted_tokens for o in outs.values()) > 0
    for rid, prompt in rids.items():
        assert outs[rid].token_ids == reference[prompt]
    assert_no_leaks(small)


def test_drafts_do_not_push_a_step_past_the_fast_path(engine, reference, monkeypatch):
    """Where the runner has a fast path up to some step size (the CPU's fused layers: 32
    tokens), adaptive drafts keep a step that fits it within it, and it stays lossless."""
    monkeypatch.setattr(engine.speculator, "fast_tokens", 7)
    # a step whose tokens cost nothing more: the cost model alone would draft to the budget
    monkeypatch.setattr(engine.speculator.cost, "coefficients", lambda: (1.0, 0.0))
    sizes: list[int] = []
    run = engine.runner.run

    def counted(sched, *args, **kwargs):
        if all(sched.num_scheduled_tokens[s.request_id] == 1 + s.num_draft_tokens
               for s in sched.seqs):  # decode and verify steps
            sizes.append(sched.total_tokens)
        return run(sched, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "run", counted)
    prompts = [list(p) for p in reference][1:8:2]  # repetitive: prompt lookup finds drafts
    outs = engine.generate(prompts, SamplingParams(max_tokens=48, ignore_eos=True,
                                                   method="ngram"))
    assert [o.token_ids for o in outs] == [reference[tuple(p)] for p in prompts]
    assert max(sizes) == 7  # four rows and their drafts: drafted, and never past 7
    assert_no_leaks(engine)


def test_prefix_cache_hits_keep_speculation_lossless(engine, reference):
    prompt = max(reference, key=len)
    params = SamplingParams(max_tokens=48, ignore_eos=True, method="draft",
                            num_speculative_tokens=4)
    first, second = (engine.generate([list(prompt)], params)[0] for _ in range(2))
    assert second.metrics.num_cached_tokens > 0
    assert first.token_ids == second.token_ids == reference[prompt]


def test_max_tokens_reached_inside_an_accepted_draft(engine, reference):
    prompt = next(iter(reference))
    for max_tokens in (1, 2, 5, 7):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, method="draft",
                                num_speculative_tokens=4)
        out = engine.generate([list(prompt)], params)[0]
        assert out.token_ids == reference[prompt][:max_tokens]
        assert out.finish_reason == "length"


def test_stop_string_inside_an_accepted_draft(engine):
    prompt = "abcabcabcabcabcabc"
    plain = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    stop = plain.text[7:10]
    want = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True,
                                                     stop=[stop]))[0]
    got = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop],
                                                    method="draft",
                                                    num_speculative_tokens=6))[0]
    assert got.finish_reason == want.finish_reason == "stop"
    assert got.text == want.text
    assert got.metrics.spec_accepted_tokens > 0


def test_streamed_deltas_add_up_to_the_text(engine):
    deltas, ids = [], []
    for out in engine.stream("the cat the cat the cat", SamplingParams(
            max_tokens=30, ignore_eos=True, method="draft", num_speculative_tokens=5)):
        deltas.append(out.delta_text)
        ids.extend(out.delta_token_ids)
    assert "".join(deltas) == out.text
    assert ids == out.token_ids
    assert len(deltas) < 30  # several tokens arrive per step


def test_abort_while_speculating_frees_everything(engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True, method="draft",
                            num_speculative_tokens=6)
    rid = engine.add_request("speculate then stop " * 3, params)
    for _ in range(3):
        engine.step()
    engine.abort(rid)
    final = run_to_completion(engine)
    assert final[rid].finish_reason == "abort"
    assert_no_leaks(engine)


def test_logprobs_follow_each_accepted_token(engine, reference):
    prompt = list(next(iter(reference)))
    want = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True,
                                                     logprobs=2))[0]
    got = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2,
                                                    method="draft",
                                                    num_speculative_tokens=4))[0]
    assert [lp.token_id for lp in got.logprobs] == got.token_ids
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.top.keys() == b.top.keys()


def test_methods_not_offered_are_refused_by_name():
    plain = Engine("tiny:llama", dtype="float32", methods=["ngram"])
    with pytest.raises(InvalidRequestError, match="offered.*ngram"):
        plain.add_request("x", SamplingParams(method="layerskip"))
    with pytest.raises(InvalidRequestError, match="method must be one of"):
        SamplingParams(method="eagle")
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
        SamplingParams(method="ngram", num_speculative_tokens=0)
    out = plain.generate(["x"], SamplingParams(max_tokens=2, method="auto"))[0]
    assert out.metrics.method == "none"
    assert_no_leaks(plain)


def test_bad_speculation_config_fails_at_start():
    with pytest.raises(ConfigError, match="draft_model"):
        Engine("tiny:llama", methods=["draft"])
    with pytest.raises(ConfigError, match="vocabulary|tokenizer"):
        Engine("tiny:llama", draft_model="default", methods=["draft"])
    with pytest.raises(ConfigError, match="layerskip"):
        Engine("tiny:llama", methods=["layerskip"], layerskip_layers=3)


def test_tree_drafts_accept_a_later_branch_and_keep_its_kv(engine, reference):
    """A tree whose right answer is the second branch at every level: the accepted nodes' KV is
    moved into place, so the following steps still give the greedy tokens."""
    prompt = list(next(iter(reference)))
    want = reference[tuple(prompt)]
    trees = []

    def propose(request_id, context, max_nodes):
        j = len(context) - len(prompt)
        nxt = (want + [0, 0, 0])[j : j + 3]
        tree = DraftTree([(nxt[0] + 1) % 256, nxt[0], (nxt[1] + 7) % 256, nxt[1], nxt[2]],
                         [-1, -1, 1, 1, 3])
        trees.append(tree)
        return tree

    lookahead = engine.speculator.lookahead
    original = lookahead.propose
    lookahead.propose = propose
    try:
        out = engine.generate([prompt], SamplingParams(max_tokens=48, ignore_eos=True,
                                                       method="lookahead",
                                                       num_speculative_tokens=5))[0]
    finally:
        lookahead.propose = original
    assert out.token_ids == want
    assert trees and out.metrics.spec_accepted_tokens >= 3 * (len(trees) - 1)
    assert out.metrics.num_forward_passes <= 1 + -(-47 // 4)


def test_medusa_heads_draft_trees_and_keep_the_greedy_tokens(reference, tmp_path):
    target = Engine("tiny:llama", dtype="float32")
    MedusaHeads.for_model(target.model, num_heads=3).save(tmp_path / "heads")
    medusa = Engine("tiny:llama", dtype="float32", block_size=8, methods=["medusa"],
                    medusa_heads=str(tmp_path / "heads"))
    prompts = [list(p) for p in reference]
    outs = medusa.generate(prompts, SamplingParams(max_tokens=48, ignore_eos=True,
                                                   method="medusa", num_speculative_tokens=6))
    assert [o.token_ids for o in outs] == list(reference.values())
    assert all(o.metrics.spec_draft_tokens > 0 for o in outs)
    assert_no_leaks(medusa)


def test_medusa_heads_come_back_after_one_slow_pass(reference, tmp_path):
    """The heads' cost is measured when they run; one absurdly slow measurement turns them off,
    and the estimate then drifts back until they are tried, and timed, again."""
    target = Engine("tiny:llama", dtype="float32")
    MedusaHeads.for_model(target.model, num_heads=3).save(tmp_path / "heads")
    medusa = Engine("tiny:llama", dtype="float32", block_size=8, methods=["medusa"],
                    medusa_heads=str(tmp_path / "heads"))
    medusa.speculator._heads_s = 0.5  # as if the last pass had stalled for half a second
    prompt = list(next(iter(reference)))
    out = medusa.generate([prompt], SamplingParams(max_tokens=128, ignore_eos=True,
                                                   method="medusa"))[0]
    assert out.token_ids[:48] == reference[tuple(prompt)]
    assert out.metrics.spec_num_drafts > 0  # the heads ran again
    assert medusa.speculator._heads_s < 0.05  # and were timed anew
    assert_no_leaks(medusa)


@pytest.mark.parametrize("conditioned", [False, True])
def test_medusa_sizes_its_trees_itself_and_stays_lossless(reference, tmp_path, conditioned):
    """Adaptive k: each tree is cut where its nodes' path probabilities stop paying; heads with a
    vocabulary draft only among its tokens; token-conditioned heads draft depth by depth. None
    of it changes a greedy token."""
    target = Engine("tiny:llama", dtype="float32")
    heads = MedusaHeads.for_model(target.model, num_heads=3, conditioned=conditioned)
    if conditioned:
        with torch.no_grad():  # drafts that follow the token before them
            heads.out.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    heads.vocab = torch.arange(0, 257, 2)  # every other token
    heads.save(tmp_path / "heads")
    medusa = Engine("tiny:llama", dtype="float32", block_size=8, methods=["medusa"],
                    medusa_heads=str(tmp_path / "heads"), max_speculative_tokens=6)
    drafted: list[list[int]] = []
    original = medusa.speculator.settle

    def keep(seq, logits, generator):
        drafted.append(list(seq.draft.tokens))
        return original(seq, logits, generator)

    medusa.speculator.settle = keep
    outs = medusa.generate([list(p) for p in reference],
                           SamplingParams(max_tokens=48, ignore_eos=True, method="medusa"))
    assert [o.token_ids for o in outs] == list(reference.values())
    assert drafted and all(1 <= len(d) <= 6 and all(t % 2 == 0 for t in d) for d in drafted)
    assert_no_leaks(medusa)
