"""Prefill and decode workers as real Ray actors, KV over real gRPC, the tiny model."""

from __future__ import annotations

import random

import pytest
import ray

from baton.actors.engine import Engine
from baton.actors.worker import Worker, WorkerSpec
from baton.sampling import SamplingParams

MODEL = "tiny:llama"
ENGINE = {"dtype": "float32", "block_size": 8, "num_threads": 1}
RemoteWorker = ray.remote(Worker)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def _spawn(role: str, **kw):
    spec = WorkerSpec(role=role, model=MODEL, engine=ENGINE, kv_token="tok",
                      prefill_threshold=16, **kw)
    actor = RemoteWorker.options(num_cpus=1).remote(spec)
    ray.get(actor.info.remote())
    return actor


@pytest.fixture(scope="module")
def workers(ray_local):
    return _spawn("prefill"), _spawn("decode")


def _generate(decode, rid, prompt, params, prefill):
    refs = decode.generate.options(num_returns="streaming").remote(rid, prompt, params, prefill)
    outs = [ray.get(r) for r in refs]
    assert outs[-1].finished
    return outs[-1]


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lengths]


def test_prefill_decode_over_the_kv_link_matches_one_engine(workers):
    prefill, decode = workers
    prompts = _prompts(0, (3, 10, 17, 40, 90, 130))  # short ones stay local, long ones travel
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = [o.token_ids for o in Engine(MODEL, **ENGINE).generate(prompts, params)]
    refs = [decode.generate.options(num_returns="streaming").remote(f"r{i}", p, params, prefill)
            for i, p in enumerate(prompts)]
    got = [[ray.get(r) for r in stream][-1].token_ids for stream in refs]
    assert got == expected
    assert ray.get(prefill.block_violations.remote()) == []
    assert ray.get(decode.block_violations.remote()) == []


def test_killed_prefill_worker_falls_back_to_local_prefill(ray_local):
    prefill, decode = _spawn("prefill", kv_timeout_s=5), _spawn("decode", kv_timeout_s=5)
    prompt = _prompts(1, (60,))[0]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = Engine(MODEL, **ENGINE).generate([prompt], params)[0].token_ids
    ray.kill(prefill)
    out = _generate(decode, "after-kill", prompt, params, prefill)
    assert out.token_ids == expected and out.finish_reason == "length"
    assert ray.get(decode.block_violations.remote()) == []
    assert ray.get(decode.info.remote())["num_running"] == 0
