"""Shared fixtures: engines start once per session; every test ends with the block invariant."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

# Without CUDA, kernel tests run Triton's CPU interpreter. It must be on before anything imports
# triton (transformers does), or triton's own library functions are compiled for a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import ray  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from baton.actors.engine import Engine  # noqa: E402
from baton.cluster.ray_start import init_local  # noqa: E402
from baton.cluster.redis_server import RedisServer  # noqa: E402

T = TypeVar("T")


def assert_no_leaks(engine: Engine) -> None:
    """Every KV block is free or owned; with nothing in flight, every block is free."""
    problems = engine.block_violations()
    assert not problems, problems
    if not engine.has_unfinished():
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def wait_until(cond: Callable[[], T], timeout_s: float = 30.0, what: str = "the condition",
               poll_s: float = 0.05) -> T:
    """Poll `cond` until it returns something truthy, and return that; fail the test after
    `timeout_s`. The way to wait for another process or thread (never a bare sleep)."""
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)
    return value


def assert_workers_idle(*workers, timeout_s: float = 30.0) -> None:
    """Each worker actor has finished every request (an abort reaches a worker's loop a moment
    after the call that caused it ends) and holds no block it should not."""
    for w in workers:
        wait_until(lambda w=w: ray.get(w.info.remote())["num_running"] == 0, timeout_s,
                   "the worker to finish its requests")
        assert ray.get(w.block_violations.remote()) == []


def run_to_completion(engine: Engine) -> dict:
    """Step until nothing is left; the final output of every request that ended, by id."""
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool) -> list[int]:
    """transformers `generate`, greedy, one request: the reference Baton must match."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    if not stop_at_eos:
        # An id the model never produces: generate would otherwise fall back to the config's EOS.
        cfg.eos_token_id = model.config.get_text_config().vocab_size + 1
        cfg.pad_token_id = 0
    else:
        cfg.eos_token_id = model.generation_config.eos_token_id or model.config.eos_token_id
        cfg.pad_token_id = cfg.eos_token_id
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():  # an explicit mask: a prompt may contain the pad id
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[0, len(prompt_ids):].tolist()


def hf_greedy_batch(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """`hf_greedy` of several requests in one left-padded `generate` (stopping at EOS): the same
    tokens in float32, in a fraction of the time for a real model."""
    eos = model.generation_config.eos_token_id or model.config.eos_token_id
    eos = eos if isinstance(eos, int) else eos[0]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                           pad_token_id=eos)
    width = max(map(len, prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, generation_config=cfg)
    rows = out[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


@pytest.fixture(scope="module")
def ray_local():
    """A Ray instance of this process's own (never one already running on the machine)."""
    # No idle workers started ahead: a test module's few actors start their own (on 2 cores this
    # saved 2.5 s of CPU per module).
    init_local(num_cpus=4, include_dashboard=False, logging_level="ERROR",
               runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
               _system_config={"prestart_worker_first_driver": False})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real redis-server (loopback, password, append-only) for the session; its client URL.

    Shared: tests isolate themselves by cluster name, and never stop it (start their own
    `RedisServer` for that).
    """
    with RedisServer(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def own_server(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop and start again."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_engine() -> Engine:
    """The embedded default model in bf16, as `baton generate` runs it."""
    return Engine(num_threads=2)


@pytest.fixture(autouse=True)
def _engines_end_clean(request):
    yield
    for name in ("default_engine", "engine"):
        if name in request.fixturenames:
            engine = request.getfixturevalue(name)
            if isinstance(engine, Engine):
                assert_no_leaks(engine)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    # `make test` splits the suite by this marker over two pytest processes side by side, each
    # with one Ray instance at a time (see the Makefile). A test on the `ray_local` fixture is a
    # Ray test whether marked or not.
    for item in items:
        if "ray_local" in item.fixturenames and "ray" not in item.keywords:
            item.add_marker(pytest.mark.ray)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
