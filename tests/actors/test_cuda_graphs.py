"""Captured decode steps (`actors/cuda_graphs.py`): the lean step they capture, run eagerly on the
CPU over the same padded buckets, gives the engine's tokens and touches no block but its own
and the scratch block; on CUDA, the replayed graphs give the eager engine's tokens."""

from __future__ import annotations

import logging
import random

import pytest
import torch

import baton.actors.engine as engine_module
from baton.actors.cuda_graphs import DecodeGraphs, buckets, unsupported
from baton.actors.engine import Engine
from baton.actors.kv_cache import PagedKVCache
from baton.actors.model_runner import BatchRow
from baton.actors.tiny import tiny_model
from baton.kernels.dispatch import force_backend
from baton.sampling import SamplingParams
from tests.conftest import assert_no_leaks, hf_greedy

ARCHS = ["llama", "qwen2", "qwen3"]


def _lean_engine(arch: str, monkeypatch, max_batch: int = 8, **options) -> Engine:
    """A CPU engine whose pure decode steps run `DecodeGraphs` uncaptured (the lean step over a
    bucket's padded static inputs), on a KV cache with a scratch block."""
    monkeypatch.setattr(engine_module, "PagedKVCache",
                        lambda *args, **kw: PagedKVCache(*args, **{**kw, "scratch_block": True}))
    engine = Engine(f"tiny:{arch}", dtype="float32", **options)
    max_blocks = -(-engine.max_model_len // engine.cache.spec.block_size)
    engine.runner.graphs = DecodeGraphs(engine.model, engine.cache, max_batch, max_blocks,
                                        capture=False)
    return engine


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


def prefilled(engine: Engine, prompts: list[list[int]], room: int) -> list[list[int]]:
    """Prefill `prompts` through the engine's own forward, each in blocks of its own with room
    for `room` more tokens; their block tables."""
    runner, bs = engine.runner, engine.cache.spec.block_size
    tables, first = [], 0
    for prompt in prompts:
        n = -(-(len(prompt) + room) // bs)
        tables.append(list(range(first, first + n)))
        first += n
    graphs, runner.graphs = runner.graphs, None
    runner.run_rows([BatchRow(p, 0, len(p), t, 1) for p, t in zip(prompts, tables, strict=True)])
    runner.graphs = graphs
    return tables


def test_buckets_cover_every_batch_size_up_to_the_largest():
    assert buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert buckets(1) == [1]
    assert buckets(3) == [1, 2, 3]
    assert buckets(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_lean_decode_step_gives_the_engines_greedy_tokens(arch, monkeypatch):
    """Batches of 1 to 7 requests (buckets 1, 2, 4 and 8, padded) decode what transformers'
    `generate` does, request by request."""
    engine = _lean_engine(arch, monkeypatch)
    ref = tiny_model(arch)
    prompts = _prompts(1, 7)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(ref, prompt, 12, stop_at_eos=False)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.steps >= 11 and graphs.replays == 0
    assert_no_leaks(engine)


def test_the_lean_step_on_the_triton_kernel_matches_the_torch_kernel(monkeypatch):
    """The paged-attention kernel a captured step calls on CUDA (here under Triton's
    interpreter), with padded rows, gives the same tokens as the PyTorch reference."""
    prompts = _prompts(2, 3)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in _lean_engine("llama", monkeypatch).generate(prompts, params)]
    with force_backend("triton"):
        engine = _lean_engine("llama", monkeypatch)
        got = [o.token_ids for o in engine.generate(prompts, params)]
    assert got == want
    assert_no_leaks(engine)


def test_padding_rows_write_only_the_scratch_block(monkeypatch):
    """A step of 3 requests runs in the bucket of 4: the cache changes at the 3 requests' new
    slots and in the scratch block, nowhere else."""
    engine = _lean_engine("llama", monkeypatch)
    graphs = engine.runner.graphs
    assert graphs is not None
    cache, bs = engine.cache, engine.cache.spec.block_size
    tables = [[0, 1], [2], [3, 4]]
    positions = [bs + 2, 5, bs]  # each a request's next token
    before = cache.blocks.clone()
    logits, hidden = graphs.run([7, 8, 9], positions, tables)
    assert logits.shape[0] == 3 and hidden.shape[0] == 3
    written = {t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)}
    changed = (cache.blocks != before).any(dim=-1)  # [layers, 2, kv_heads, blocks, block_size]
    changed = changed.any(dim=(0, 1, 2)).flatten().nonzero().flatten().tolist()
    scratch = range(cache.scratch_block * bs, (cache.scratch_block + 1) * bs)
    assert set(changed) - set(scratch) == written
    assert set(changed) & set(scratch)  # the padding row wrote there


def test_the_lean_step_logits_and_hidden_states_match_the_engines_forward(monkeypatch):
    """One decode step of 5 requests (bucket 8) through the lean step and through the engine's
    own forward, over the same prompts' KV."""
    engine = _lean_engine("qwen3", monkeypatch)
    runner = engine.runner
    prompts = _prompts(3, 5)
    tables = prefilled(engine, prompts, room=1)
    graphs, runner.graphs = runner.graphs, None
    rows = [BatchRow(p + [7], len(p), 1, t, 1) for p, t in zip(prompts, tables, strict=True)]
    eager = runner.run_rows(rows, capture_hidden=True)
    eager_hidden = runner.last_hidden
    runner.graphs = graphs
    lean = runner.run_rows(rows, capture_hidden=True)
    assert graphs is not None and graphs.steps == 1
    torch.testing.assert_close(lean, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.last_hidden, eager_hidden, rtol=1e-5, atol=1e-5)


def test_a_failed_capture_turns_the_graphs_off_and_the_engines_forward_runs(monkeypatch,
                                                                             caplog):
    engine = _lean_engine("llama", monkeypatch)
    graphs = engine.runner.graphs
    assert graphs is not None
    graphs.capture = True  # on a CPU, capturing fails
    prompts = _prompts(5, 3)
    with caplog.at_level(logging.WARNING, logger="baton.actors.cuda_graphs"):
        outs = engine.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    assert "CUDA graphs are off" in caplog.text
    assert not graphs.enabled and graphs.steps == 0 and not graphs.fits(1)
    ref = tiny_model("llama")
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(ref, prompt, 5, stop_at_eos=False)
    assert_no_leaks(engine)


def test_no_graphs_off_cuda_or_for_an_architecture_the_lean_step_does_not_run():
    engine = Engine("tiny:llama", dtype="float32")
    assert engine.runner.graphs is None and engine.cache.scratch_block is None
    cache = PagedKVCache(engine.cache.spec, 8, torch.device("cpu"), scratch_block=True)
    assert cache.scratch_block == 8 and cache.blocks.shape[3] == 9
    assert DecodeGraphs.build(engine.model, cache, 8, 4) is None  # not on CUDA
    with pytest.raises(ValueError, match="scratch block"):
        DecodeGraphs(engine.model, engine.cache, 8, 4)
    assert unsupported(engine.model) is None
    assert "MixtralForCausalLM" in unsupported(tiny_model("mixtral"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_replayed_graphs_give_the_eager_engines_tokens_on_cuda(arch):
    prompts = _prompts(4, 12)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    eager = Engine(f"tiny:{arch}", dtype="float32", device="cuda", cuda_graphs=False)
    want = [o.token_ids for o in eager.generate(prompts, params)]
    engine = Engine(f"tiny:{arch}", dtype="float32", device="cuda")
    got = [o.token_ids for o in engine.generate(prompts, params)]
    assert got == want
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.enabled and graphs.replays > 0
    assert_no_leaks(engine)
