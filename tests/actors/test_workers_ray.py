"""Prefill and decode workers as real Ray actors, KV over real gRPC, the tiny model."""

from __future__ import annotations

import asyncio
import pickle
import random
import sys
import threading

import grpc
import pytest
import ray

from baton.actors.engine import Engine
from baton.actors.worker import Worker, WorkerSpec
from baton.errors import ContextLengthError
from baton.outputs import RequestOutput
from baton.router.worker_link import PREFILL_METHOD, TOKEN_HEADER, raw_bytes
from baton.router.worker_streams import open_stream, unpack_output
from baton.sampling import SamplingParams
from tests.conftest import wait_until

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

MODEL = "tiny:llama"
ENGINE = {"dtype": "float32", "block_size": 8, "num_threads": 1}


class HoldableWorker(Worker):
    """A worker whose engine loop a test can stop between steps: the way to act while a decode
    worker waits on its prefill worker, however fast the prefill would otherwise be."""

    async def hold(self) -> None:
        gate = self._gate = threading.Event()
        self.loop.call(lambda _: gate.wait())

    async def release(self) -> None:
        self._gate.set()


class NowhereLinkWorker(HoldableWorker):
    """A worker whose request endpoint points where nothing listens."""

    async def request_endpoint(self) -> tuple[str, str]:
        return "127.0.0.1:1", "no-token"


# Ray's workers cannot import a test module: the class travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
RemoteWorker = ray.remote(HoldableWorker)


def _spawn(role: str, engine=ENGINE, cls=RemoteWorker, **kw):
    spec = WorkerSpec(role=role, model=MODEL, engine=engine, kv_token="tok",
                      prefill_threshold=16, **kw)
    actor = cls.options(num_cpus=1).remote(spec)
    ray.get(actor.info.remote())
    return actor


@pytest.fixture(scope="module")
def workers(ray_local):
    """A prefill worker and a decode worker whose callers' leases last 1 s."""
    return _spawn("prefill"), _spawn("decode", caller_lease_s=1.0)


def _waiting_on_prefill(decode, handoffs: int) -> None:
    wait_until(lambda: ray.get(decode.info.remote())["handoffs"] == handoffs, 60,
               "the decode worker to reserve blocks and wait on the prefill worker")


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
    info = ray.get(decode.info.remote())
    assert info["handoffs"] == 4 and info["handoff_failures"] == 0  # prompts of 17+ tokens
    # The decode worker called its prefill worker over the prefill worker's request link.
    assert info["handoff_calls_grpc"] == 4 and info["handoff_calls_ray"] == 0
    assert ray.get(prefill.block_violations.remote()) == []
    assert ray.get(decode.block_violations.remote()) == []


def test_a_prefill_call_without_the_workers_token_is_refused(workers):
    prefill, _ = workers
    address, token = ray.get(prefill.request_endpoint.remote())
    args = ("t/1", "r", [5] * 40, SamplingParams(max_tokens=1), "127.0.0.1:1", [0, 1, 2, 3, 4], 0)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(PREFILL_METHOD, request_serializer=raw_bytes,
                                   response_deserializer=raw_bytes)
        for wrong in ("", token[:-1] + "x"):
            with pytest.raises(grpc.RpcError) as err:
                call(pickle.dumps(args), metadata=((TOKEN_HEADER, wrong),), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ray.get(prefill.block_violations.remote()) == []


def test_a_prefill_worker_whose_link_fails_is_called_over_ray_from_then_on(ray_local):
    prefill = _spawn("prefill", cls=ray.remote(NowhereLinkWorker))
    decode = _spawn("decode", kv_timeout_s=10)
    prompts = _prompts(7, (40, 60))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = [o.token_ids for o in Engine(MODEL, **ENGINE).generate(prompts, params)]
    first = _generate(decode, "link-fails", prompts[0], params, prefill)
    assert first.token_ids == expected[0] and first.metrics.prefill_path == "local"
    info = ray.get(decode.info.remote())
    assert (info["handoff_failures"], info["handoff_calls_grpc"], info["handoff_calls_ray"]) == (
        1, 1, 0)
    second = _generate(decode, "over-ray", prompts[1], params, prefill)
    assert second.token_ids == expected[1] and second.metrics.prefill_path == "disaggregated"
    info = ray.get(decode.info.remote())
    assert (info["handoff_failures"], info["handoff_calls_grpc"], info["handoff_calls_ray"]) == (
        1, 1, 1)
    assert ray.get(decode.block_violations.remote()) == []
    assert ray.get(prefill.block_violations.remote()) == []
    ray.kill(prefill)
    ray.kill(decode)


def test_killed_prefill_worker_falls_back_to_local_prefill(ray_local):
    prefill, decode = _spawn("prefill", kv_timeout_s=5), _spawn("decode", kv_timeout_s=5)
    prompt = _prompts(1, (60,))[0]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = Engine(MODEL, **ENGINE).generate([prompt], params)[0].token_ids
    ray.kill(prefill)
    out = _generate(decode, "after-kill", prompt, params, prefill)
    assert out.token_ids == expected and out.finish_reason == "length"
    assert ray.get(decode.block_violations.remote()) == []
    info = ray.get(decode.info.remote())
    assert info["num_running"] == 0 and info["handoff_failures"] == 1


def test_pools_of_different_dtypes_fall_back_to_local_prefill(ray_local):
    """dtype auto can resolve differently on two machine types: the KV link refuses a cache of
    another dtype, and the decode worker prefills itself, with its own dtype's tokens."""
    prefill = _spawn("prefill", engine={**ENGINE, "dtype": "bfloat16"})
    decode = _spawn("decode")
    assert ray.get(prefill.info.remote())["dtype"] == "bfloat16"
    assert ray.get(decode.info.remote())["dtype"] == "float32"
    prompt = _prompts(2, (40,))[0]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = Engine(MODEL, **ENGINE).generate([prompt], params)[0].token_ids
    out = _generate(decode, "mixed-dtypes", prompt, params, prefill)
    assert out.token_ids == expected
    info = ray.get(decode.info.remote())
    assert info["handoff_failures"] == 1 and info["num_running"] == 0
    assert ray.get(decode.block_violations.remote()) == []
    ray.kill(prefill)
    ray.kill(decode)


def test_prefill_worker_killed_mid_request_falls_back_and_leaks_nothing(ray_local):
    prefill = _spawn("prefill")
    decode = _spawn("decode", kv_timeout_s=10)
    prompt = _prompts(4, (1500,))[0]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    ray.get(prefill.hold.remote())  # the kill lands while the decode worker waits on it
    stream = decode.generate.options(num_returns="streaming").remote("mid", prompt, params,
                                                                      prefill)
    _waiting_on_prefill(decode, 1)
    ray.kill(prefill)
    out = [ray.get(r) for r in stream][-1]
    expected = Engine(MODEL, **ENGINE).generate([prompt], params)[0].token_ids
    assert out.token_ids == expected and out.finish_reason == "length"
    assert ray.get(decode.block_violations.remote()) == []
    info = ray.get(decode.info.remote())
    assert info["handoffs"] == 1 and info["handoff_failures"] == 1


def test_a_caller_that_stops_renewing_its_lease_mid_handoff_has_its_blocks_freed(workers):
    prefill, decode = workers
    prompt = _prompts(5, (1500,))[0]
    handoffs = ray.get(decode.info.remote())["handoffs"] + 1
    ray.get(prefill.hold.remote())
    stream = decode.generate.options(num_returns="streaming").remote(
        "orphan", prompt, SamplingParams(max_tokens=5, ignore_eos=True), prefill, "gone-caller")
    _waiting_on_prefill(decode, handoffs)
    assert ray.get(decode.info.remote())["kv_usage"] > 0  # its blocks reserved for the handoff
    # Nobody renews "gone-caller": its lease lapses while the decode worker waits on the prefill.
    wait_until(lambda: ray.get(decode.info.remote())["lease_expiries"] == 1, 30, "the expiry")
    wait_until(lambda: ray.get(decode.info.remote())["kv_usage"] == 0, 30, "its blocks freed")
    with pytest.raises(ray.exceptions.RayError):  # the stream ends; it does not hang
        for ref in stream:
            ray.get(ref, timeout=30)
    assert ray.get(decode.block_violations.remote()) == []
    # Released, the prefill worker's push finds its transfer refused, and it keeps serving.
    ray.get(prefill.release.remote())
    out = _generate(decode, "after-orphan", _prompts(6, (40,))[0],
                    SamplingParams(max_tokens=3, ignore_eos=True), prefill)
    assert out.finish_reason == "length"
    assert ray.get(prefill.block_violations.remote()) == []
    assert ray.get(decode.block_violations.remote()) == []


def test_killed_decode_worker_ends_the_stream_with_a_clear_error(ray_local):
    decode = _spawn("decode")
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    stream = decode.generate.options(num_returns="streaming").remote("doomed", [1, 2, 3], params,
                                                                      None)
    first = ray.get(next(stream))
    assert not first.finished
    ray.kill(decode)
    with pytest.raises(ray.exceptions.RayActorError):
        for ref in stream:
            ray.get(ref, timeout=30)


def test_bad_request_raises_a_typed_error_and_the_worker_keeps_serving(workers):
    prefill, decode = workers
    bad = decode.generate.options(num_returns="streaming").remote(
        "bad", [1] * 3000, SamplingParams(max_tokens=10), prefill)
    with pytest.raises(ContextLengthError, match="context"):
        for ref in bad:
            ray.get(ref)
    out = _generate(decode, "good", [1, 2, 3], SamplingParams(max_tokens=3), prefill)
    assert out.finish_reason == "length"
    assert ray.get(decode.block_violations.remote()) == []


def test_streamed_requests_give_the_engines_tokens_and_text_in_order(workers):
    _, decode = workers
    # Eight at once: the worker's streaming task falls behind the engine, which steps all eight
    # together, so tokens get grouped into fewer stream items.
    prompts = _prompts(7, (12,) * 8)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = Engine(MODEL, **ENGINE).generate(prompts, params)
    streams = [decode.generate.options(num_returns="streaming").remote(f"streamed-{i}", p,
                                                                        params, None)
               for i, p in enumerate(prompts)]
    for stream, want in zip(streams, expected, strict=True):
        outs = [ray.get(r, timeout=30) for r in stream]
        # However the tokens were grouped into stream items, their deltas add up to the engine's.
        assert [t for o in outs for t in o.delta_token_ids] == want.token_ids
        assert "".join(o.delta_text for o in outs) == want.text
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        final = outs[-1]
        assert (final.token_ids, final.text, final.finish_reason) == (
            want.token_ids, want.text, "length")


def test_a_caller_that_cancels_its_stream_has_the_request_aborted_and_its_blocks_freed(workers):
    _, decode = workers
    aborted = ray.get(decode.info.remote())["finished"].get("abort", 0)
    stream = decode.generate.options(num_returns="streaming").remote(
        "cancelled", [1, 2, 3], SamplingParams(max_tokens=1000, ignore_eos=True), None)
    assert not ray.get(next(stream)).finished
    ray.cancel(stream)
    wait_until(lambda: ray.get(decode.info.remote())["finished"].get("abort", 0) == aborted + 1,
               30, "the worker to abort the cancelled request")
    info = ray.get(decode.info.remote())
    assert info["num_running"] == 0 and info["kv_usage"] == 0
    assert ray.get(decode.block_violations.remote()) == []


def test_the_routers_packed_call_streams_what_generate_does_and_raises_the_same_errors(workers):
    prefill, decode = workers
    prompt = _prompts(11, (20,))[0]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = _generate(decode, "unpacked", prompt, params, None)

    async def through_stream(rid: str, ids: list[int]) -> list[RequestOutput]:
        return [await unpack_output(ref)
                for ref in open_stream(decode, rid, ids, params, prefill, "caller-1")]

    outs = asyncio.run(through_stream("packed", prompt))
    assert [t for o in outs for t in o.delta_token_ids] == want.token_ids
    assert (outs[-1].text, outs[-1].finish_reason) == (want.text, "length")
    with pytest.raises(ContextLengthError, match="context"):
        asyncio.run(through_stream("packed-bad", [1] * 3000))
    assert ray.get(decode.block_violations.remote()) == []
