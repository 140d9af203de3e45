"""Captured steps of short runs (`DecodeGraphs.run_runs`): verify steps of every acceleration
method, padded to a run length, run through the lean step over static buffers. Uncaptured on the
CPU, they give the greedy tokens of `none`, the eager forward's logits, and write no block but
the requests' own and the scratch block."""

from __future__ import annotations

import random

import pytest
import torch

import baton.actors.engine as engine_module
from baton.actors.cuda_graphs import RUN_BUCKETS, DecodeGraphs
from baton.actors.draft_tree import DraftTree
from baton.actors.engine import Engine
from baton.actors.kv_cache import PagedKVCache
from baton.actors.medusa import MedusaHeads
from baton.actors.model_runner import BatchRow
from baton.kernels.dispatch import force_backend
from baton.sampling import SamplingParams
from tests.actors.test_cuda_graphs import prefilled
from tests.conftest import assert_no_leaks

METHODS = ["ngram", "lookahead", "layerskip", "draft", "medusa"]


def _prompts(seed: int, n: int) -> list[list[int]]:
    """Half repetitive (drafts get accepted), half random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        unit = [rng.randrange(3, 250) for _ in range(rng.randrange(3, 7))]
        out.append(unit * rng.randrange(3, 6) if i % 2 == 0
                   else [rng.randrange(3, 250) for _ in range(rng.randrange(2, 30))])
    return out


def _engine(monkeypatch, heads: str | None = None, graphs: bool = True, **options) -> Engine:
    monkeypatch.setattr(engine_module, "PagedKVCache",
                        lambda *args, **kw: PagedKVCache(*args, **{**kw, "scratch_block": True}))
    methods = [m for m in METHODS if heads or m != "medusa"]
    engine = Engine("tiny:llama", dtype="float32", block_size=8, draft_model="tiny:llama",
                    methods=["none", *methods], medusa_heads=heads, **options)
    if graphs:
        max_blocks = -(-engine.max_model_len // engine.cache.spec.block_size)
        engine.runner.graphs = DecodeGraphs(engine.model, engine.cache, 8, max_blocks,
                                            capture=False)
    return engine


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("heads") / "heads"
    MedusaHeads.for_model(Engine("tiny:llama", dtype="float32").model, num_heads=3).save(path)
    return str(path)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_verifies_through_the_run_graphs_losslessly(method, monkeypatch, heads):
    prompts = _prompts(1, 6)
    want = [o.token_ids for o in Engine("tiny:llama", dtype="float32").generate(
        prompts, SamplingParams(max_tokens=32, ignore_eos=True))]
    engine = _engine(monkeypatch, heads)
    outs = engine.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True,
                                                   method=method, num_speculative_tokens=4))
    assert [o.token_ids for o in outs] == want
    assert sum(o.metrics.spec_draft_tokens for o in outs) > 0
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.run_steps > 0
    assert_no_leaks(engine)


@pytest.mark.parametrize("method", ["lookahead", "medusa"])
def test_draft_trees_through_the_triton_kernel_in_run_graphs(method, monkeypatch, heads):
    """The kernel a captured run step calls on CUDA (here under Triton's interpreter): padded
    runs, varlen query starts and tree masks give the greedy tokens of `none`."""
    prompts = _prompts(2, 3)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in Engine("tiny:llama", dtype="float32").generate(prompts, params)]
    with force_backend("triton"):
        engine = _engine(monkeypatch, heads)
        outs = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True,
                                                       method=method,
                                                       num_speculative_tokens=4))
    assert [o.token_ids for o in outs] == want
    assert engine.runner.graphs is not None and engine.runner.graphs.run_steps > 0
    assert_no_leaks(engine)


def test_a_verify_step_gives_the_eager_forwards_logits_and_hidden_states(monkeypatch):
    """A decode row, a chain of 3 drafts and a tree of 5 nodes in one step (bucket of 4
    requests, runs of 8): the lean step's logits and hidden states are the engine's forward's."""
    engine = _engine(monkeypatch)
    runner = engine.runner
    prompts = _prompts(3, 3)
    tables = prefilled(engine, prompts, room=8)
    tree = DraftTree([11, 12, 13, 14, 15], [-1, -1, 0, 0, 2])
    rows = [BatchRow(prompts[0] + [7], len(prompts[0]), 1, tables[0], 1),
            BatchRow(prompts[1] + [7, 8, 9, 10], len(prompts[1]), 4, tables[1], 4),
            BatchRow(prompts[2] + [7, *tree.tokens], len(prompts[2]), 6, tables[2], 6, tree)]
    graphs, runner.graphs = runner.graphs, None
    eager = runner.run_rows(rows, capture_hidden=True)
    eager_hidden = runner.last_hidden
    runner.graphs = graphs
    lean = runner.run_rows(rows, capture_hidden=True)
    assert graphs is not None and graphs.run_steps == 1
    assert lean.shape == eager.shape == (11, engine.vocab_size)
    torch.testing.assert_close(lean, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.last_hidden, eager_hidden, rtol=1e-5, atol=1e-5)


def test_padded_runs_write_only_their_slots_and_the_scratch_block(monkeypatch):
    engine = _engine(monkeypatch)
    graphs, cache, bs = engine.runner.graphs, engine.cache, engine.cache.spec.block_size
    assert graphs is not None
    prompts = _prompts(4, 3)
    tables = prefilled(engine, prompts, room=8)
    rows = [BatchRow(prompts[0] + [7, 8, 9], len(prompts[0]), 3, tables[0], 3),
            BatchRow(prompts[1] + [7], len(prompts[1]), 1, tables[1], 1),
            BatchRow(prompts[2] + [7, 8], len(prompts[2]), 2, tables[2], 2)]
    before = cache.blocks.clone()
    logits = engine.runner.run_rows(rows)
    assert logits.shape[0] == 6 and graphs.run_steps == 1
    written = {t[p // bs] * bs + p % bs for row, t in zip(rows, tables, strict=True)
               for p in range(row.start, row.start + row.num_tokens)}
    changed = (cache.blocks != before).any(dim=-1)
    changed = changed.any(dim=(0, 1, 2)).flatten().nonzero().flatten().tolist()
    scratch = range(cache.scratch_block * bs, (cache.scratch_block + 1) * bs)
    assert set(changed) - set(scratch) == written
    assert set(changed) & set(scratch)  # the padding tokens and the padding request wrote there


def test_runs_longer_than_the_largest_bucket_take_the_engines_forward(monkeypatch):
    engine = _engine(monkeypatch)
    graphs = engine.runner.graphs
    assert graphs is not None
    assert graphs.fits_runs([1, RUN_BUCKETS[-1]]) and not graphs.fits_runs([RUN_BUCKETS[-1] + 1])
    prompt = list(range(3, 3 + RUN_BUCKETS[-1] + 5))  # a prompt too long for a run bucket
    engine.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))
    assert graphs.run_steps == 0


def test_steps_of_more_run_tokens_than_a_bucket_keeps_take_the_engines_forward(monkeypatch):
    engine = _engine(monkeypatch)
    graphs = engine.runner.graphs
    assert graphs is not None
    graphs.max_batch, graphs.sizes = 64, [1, 2, 4, 8, 16, 32, 64]
    assert graphs.fits_runs([16] * 32) and not graphs.fits_runs([16] * 33)
    assert graphs.fits_runs([8] * 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replayed_run_graphs_give_every_methods_greedy_tokens_on_cuda(tmp_path):
    heads = tmp_path / "heads"
    MedusaHeads.for_model(Engine("tiny:llama", dtype="float32").model, num_heads=3).save(heads)
    prompts = _prompts(5, 8)
    want = [o.token_ids for o in Engine("tiny:llama", dtype="float32", device="cuda",
                                        cuda_graphs=False).generate(
        prompts, SamplingParams(max_tokens=24, ignore_eos=True))]
    engine = Engine("tiny:llama", dtype="float32", device="cuda", block_size=8,
                    draft_model="tiny:llama", methods=["none", *METHODS],
                    medusa_heads=str(heads))
    for method in METHODS:
        outs = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True,
                                                       method=method, num_speculative_tokens=4))
        assert [o.token_ids for o in outs] == want, method
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.enabled and graphs.run_steps > 0 and graphs.replays > 0
    assert_no_leaks(engine)


def test_a_failed_run_capture_leaves_decode_graphs_on(monkeypatch, caplog):
    engine = _engine(monkeypatch)
    graphs = engine.runner.graphs
    assert graphs is not None
    prompts = _prompts(6, 2)
    tables = prefilled(engine, prompts, room=8)
    rows = [BatchRow(p + [7, 8], len(p), 2, t, 2) for p, t in zip(prompts, tables, strict=True)]
    graphs.capture = True  # on a CPU, capturing fails
    with caplog.at_level("WARNING", logger="baton.actors.cuda_graphs"):
        eager = engine.runner.run_rows(rows)
    assert "steps of runs" in caplog.text
    assert not graphs.runs_enabled and graphs.enabled and not graphs.fits_runs([2, 2])
    assert eager.shape[0] == 4 and graphs.run_steps == 0
    graphs.capture = False
    decode = [BatchRow(p + [7, 8, 9], len(p) + 2, 1, t, 1)
              for p, t in zip(prompts, tables, strict=True)]
    engine.runner.run_rows(decode)
    assert graphs.steps == 1  # the decode step still ran on its graph path
