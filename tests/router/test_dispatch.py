"""The dispatcher over real Ray workers (tiny model, KV over real gRPC): choice, retry, abort,
and requests over the workers' gRPC request links."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import ray

from baton.actors.engine import Engine
from baton.actors.worker import Worker, WorkerSpec
from baton.errors import ContextLengthError, WorkerUnavailableError
from baton.router.dispatch import Dispatcher
from baton.router.worker_link import METHOD, TOKEN_HEADER, Endpoint, pack_request
from baton.sampling import SamplingParams
from tests.conftest import assert_workers_idle

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

MODEL = "tiny:llama"
ENGINE = {"dtype": "float32", "block_size": 8, "num_threads": 1}
RemoteWorker = ray.remote(Worker)


def spawn(role: str):
    spec = WorkerSpec(role=role, model=MODEL, engine=ENGINE, kv_token="tok",
                      prefill_threshold=16, kv_timeout_s=10)
    actor = RemoteWorker.options(num_cpus=1).remote(spec)
    ray.get(actor.info.remote())
    return actor


def prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lengths]


async def collect(dispatcher: Dispatcher, rid: str, prompt, params):
    outs = [o async for o in dispatcher.generate(rid, prompt, params)]
    assert outs[-1].finished
    return outs[-1]


@pytest.fixture(scope="module")
def cluster(ray_local):
    return spawn("prefill"), spawn("decode"), spawn("decode")


def test_requests_spread_over_decode_workers_and_match_one_engine(cluster):
    prefill, *decodes = cluster
    ps = prompts(0, (5, 12, 30, 50, 70, 90))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = [o.token_ids for o in Engine(MODEL, **ENGINE).generate(ps, params)]
    before = [ray.get(d.info.remote())["handoffs"] for d in decodes]

    async def run():
        d = Dispatcher(decodes, [prefill])
        return await asyncio.gather(*(collect(d, f"s{i}", p, params) for i, p in enumerate(ps)))

    got = asyncio.run(run())
    assert [o.token_ids for o in got] == expected
    handoffs = [ray.get(d.info.remote())["handoffs"] - b for d, b in
                zip(decodes, before, strict=True)]
    assert sum(handoffs) == 4 and all(h > 0 for h in handoffs)  # both decode workers served
    assert_workers_idle(prefill, *decodes)


def test_a_dead_decode_worker_before_the_first_token_is_retried_elsewhere(cluster):
    prefill, _, alive = cluster
    dead = spawn("decode")
    ray.kill(dead)
    prompt = prompts(1, (40,))[0]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = Engine(MODEL, **ENGINE).generate([prompt], params)[0].token_ids

    async def run():
        d = Dispatcher([dead, alive], [prefill])  # the first pick is the dead one
        out = await collect(d, "retry", prompt, params)
        again = await collect(d, "after", prompt, params)  # the dead worker left the rotation
        return d, out, again

    d, out, again = asyncio.run(run())
    assert out.token_ids == expected == again.token_ids
    assert d.retries == 1 and len(d.decode) == 1
    assert_workers_idle(prefill, alive)


def test_a_decode_worker_dying_mid_stream_ends_it_with_a_clear_error(ray_local):
    doomed = spawn("decode")
    params = SamplingParams(max_tokens=1500, ignore_eos=True)

    async def run():
        d = Dispatcher([doomed])
        stream = d.generate("doomed", [1, 2, 3], params)
        first = await stream.__anext__()
        assert first.token_ids and not first.finished
        ray.kill(doomed)
        with pytest.raises(WorkerUnavailableError, match="send the request again"):
            await asyncio.wait_for(_drain(stream), timeout=30)
        with pytest.raises(WorkerUnavailableError, match="no live decode worker"):
            await collect(d, "nobody", [1, 2, 3], params)

    asyncio.run(run())


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def test_a_caller_that_stops_reading_frees_the_request_in_its_worker(cluster):
    prefill, decode, _ = cluster
    params = SamplingParams(max_tokens=1500, ignore_eos=True)

    aborted = ray.get(decode.info.remote())["finished"].get("abort", 0)

    async def run():
        d = Dispatcher([decode], [prefill])
        stream = d.generate("left", prompts(2, (60,))[0], params)
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(run())
    assert_workers_idle(prefill, decode)  # the abort reaches the worker's loop shortly after
    assert ray.get(decode.info.remote())["finished"]["abort"] == aborted + 1


def test_prompts_sharing_a_prefix_go_where_it_is_cached(cluster):
    prefill, *decodes = cluster
    shared = prompts(7, (64,))[0]
    params = SamplingParams(max_tokens=2, ignore_eos=True)

    async def run():
        d = Dispatcher(decodes, [prefill])
        first = await collect(d, "p0", shared + [1], params)
        follow = [await collect(d, f"p{i}", shared + [i + 2, i + 3], params) for i in range(4)]
        return first, follow

    first, follow = asyncio.run(run())
    assert first.metrics.num_cached_tokens == 0
    # Without affinity, turns would alternate between the two idle workers: half would miss.
    assert all(o.metrics.num_cached_tokens >= 48 for o in follow)
    assert_workers_idle(prefill, *decodes)


# -- the request link (router/worker_link.py): both transports, refusals, fallback to Ray --


@pytest.mark.parametrize("transport", ["grpc", "ray"])
def test_requests_stream_over_either_transport_handoffs_included(cluster, transport):
    prefill, decode, _ = cluster
    # Fresh prompts per transport (none cached); 40 and 90 tokens go through the prefill worker.
    ps = prompts(len(transport), (6, 40, 90))
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = [o.token_ids for o in Engine(MODEL, **ENGINE).generate(ps, params)]
    handoffs = ray.get(decode.info.remote())["handoffs"]

    async def run():
        d = Dispatcher([decode], [prefill], transport=transport)
        outs = await asyncio.gather(*(collect(d, f"{transport}-{i}", p, params)
                                      for i, p in enumerate(ps)))
        return d.streams, outs

    streams, outs = asyncio.run(run())
    assert streams == {"grpc": 0, "ray": 0} | {transport: 3}
    assert [o.token_ids for o in outs] == expected
    assert [o.metrics.prefill_path for o in outs] == ["local", "disaggregated", "disaggregated"]
    assert ray.get(decode.info.remote())["handoffs"] - handoffs == 2
    assert_workers_idle(prefill, decode)


def test_a_request_the_worker_refuses_arrives_as_its_typed_error(cluster):
    _, decode, _ = cluster

    async def run():
        d = Dispatcher([decode])
        with pytest.raises(ContextLengthError, match="max_tokens"):
            await collect(d, "too-long", [1, 2, 3], SamplingParams(max_tokens=10**6))
        return d.streams

    assert asyncio.run(run())["grpc"] == 1
    assert_workers_idle(decode)


def test_a_call_without_the_workers_token_is_refused_before_it_is_read(cluster):
    _, decode, _ = cluster
    address, token = ray.get(decode.request_endpoint.remote())
    finished = dict(ray.get(decode.info.remote())["finished"])
    packed = pack_request("intruder", [1, 2, 3], SamplingParams(max_tokens=4), None, None)

    async def call(metadata):
        async with grpc.aio.insecure_channel(address) as channel:
            stream = channel.unary_stream(METHOD)(packed, metadata=metadata)
            return [frame async for frame in stream]

    for metadata in ((), ((TOKEN_HEADER, token[::-1]),)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(call(metadata))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ray.get(decode.info.remote())["finished"] == finished  # nothing was admitted
    assert len(asyncio.run(call(((TOKEN_HEADER, token),)))) >= 1  # the right token is served


def test_a_worker_whose_link_fails_serves_over_ray(cluster):
    prefill, decode, _ = cluster
    prompt = prompts(4, (30,))[0]
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    async def run():
        d = Dispatcher([decode], [prefill])
        expected = await collect(d, "linked", prompt, params)
        assert d.links is not None
        _, token = await decode.request_endpoint.remote()
        d.links._ends[decode] = Endpoint("127.0.0.1:1", token)  # nothing listens there
        out = await collect(d, "unlinked", prompt, params)
        again = await collect(d, "after", prompt, params)
        return d, expected, out, again

    d, expected, out, again = asyncio.run(run())
    assert out.token_ids == expected.token_ids == again.token_ids
    assert d.streams == {"grpc": 2, "ray": 2}  # the failed call, then Ray from there on
    assert d.retries == 0 and len(d.decode) == 1  # the worker was not taken for dead
    assert_workers_idle(prefill, decode)
