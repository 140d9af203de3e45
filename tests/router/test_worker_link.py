"""Requests streamed from the dispatcher to real Ray workers over their gRPC request links."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import ray

from baton.actors.engine import Engine
from baton.errors import ContextLengthError
from baton.router.dispatch import Dispatcher
from baton.router.worker_link import METHOD, TOKEN_HEADER, Endpoint, pack_request
from baton.sampling import SamplingParams
from tests.conftest import assert_workers_idle
from tests.router.test_dispatch import ENGINE, MODEL, collect, prompts, spawn

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)


@pytest.fixture(scope="module")
def pair(ray_local):
    return spawn("prefill"), spawn("decode")


@pytest.mark.parametrize("transport", ["grpc", "ray"])
def test_requests_stream_over_either_transport_handoffs_included(pair, transport):
    prefill, decode = pair
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


def test_a_request_the_worker_refuses_arrives_as_its_typed_error(pair):
    _, decode = pair

    async def run():
        d = Dispatcher([decode])
        with pytest.raises(ContextLengthError, match="max_tokens"):
            await collect(d, "too-long", [1, 2, 3], SamplingParams(max_tokens=10**6))
        return d.streams

    assert asyncio.run(run())["grpc"] == 1
    assert_workers_idle(decode)


def test_a_call_without_the_workers_token_is_refused_before_it_is_read(pair):
    _, decode = pair
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


def test_a_worker_whose_link_fails_serves_over_ray(pair):
    prefill, decode = pair
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
