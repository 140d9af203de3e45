"""The OpenAI-compatible HTTP front end end to end: a router over real Ray workers (tiny model,
KV over real gRPC), served by aiohttp in a background loop, driven by the official `openai`
client; Prometheus metrics read back from `/metrics`."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from baton.actors.engine import Engine
from baton.actors.model_source import load_tokenizer, resolve
from baton.actors.worker import Worker, WorkerSpec
from baton.client import BatonClient
from baton.cluster.state import ClusterState
from baton.errors import InvalidRequestError
from baton.router.app import RouterActor, RouterSettings
from baton.router.core import Router, ServedModel
from baton.router.dispatch import Dispatcher
from baton.router.http import serve_http
from baton.router.openai_api import parse_chat, parse_completion
from baton.sampling import SamplingParams
from tests.conftest import assert_workers_idle

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

MODEL = "tiny:llama"
ENGINE = {"dtype": "float32", "block_size": 8, "num_threads": 1}
TOKEN = "test-token"


def spawn(role: str):
    spec = WorkerSpec(role=role, model=MODEL, engine=ENGINE, kv_token="tok", prefill_threshold=16)
    actor = ray.remote(Worker).options(num_cpus=1).remote(spec)
    ray.get(actor.info.remote())
    return actor


class Server:
    """A router and its HTTP front end on an event loop in a background thread."""

    def __init__(self, decode: list[Any], prefill: list[Any], token: str | None = TOKEN,
                 state: ClusterState | None = None):
        info = ray.get(decode[0].info.remote()) if decode else {"model": MODEL,
                                                                  "vocab_size": 257,
                                                                  "max_model_len": 2048}
        model = ServedModel(name=info["model"], tokenizer=load_tokenizer(resolve(MODEL)),
                            vocab_size=info["vocab_size"], max_model_len=info["max_model_len"])
        self.router = Router(model, Dispatcher(decode, prefill), state=state)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner, port = self.call(serve_http(self.router, "127.0.0.1", 0, token=token))
        self.url = f"http://127.0.0.1:{port}"

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def workers(ray_local):
    return spawn("prefill"), spawn("decode")


@pytest.fixture(scope="module")
def server(workers) -> Iterator[Server]:
    prefill, decode = workers
    s = Server([decode], [prefill])
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 256) for _ in range(n)]


def raw(url: str, body: bytes | None = None, token: str | None = TOKEN) -> tuple[int, Any]:
    """Status and decoded body of one plain HTTP request (POST when there is a body)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, data = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    text = data.decode()
    return status, json.loads(text) if text.startswith("{") else text


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of `url`/metrics by (name, sorted labels), model label left out."""
    status, text = raw(url + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def test_completions_give_what_one_engine_computes_whole_and_streamed(server, client, workers):
    short, long = ids(0, 6), ids(1, 70)  # prefilled locally / on the prefill worker
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    engine = Engine(MODEL, **ENGINE)
    want = engine.generate([short, long, "hello there"], params)
    name = server.router.model.name
    for prompt, expected in zip((short, long, "hello there"), want, strict=True):
        kw = {"model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
        whole = client.completions.create(**kw)
        assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
        assert whole.choices[0].text == expected.text
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == 10
        assert whole.usage.prompt_tokens == expected.metrics.num_prompt_tokens
        chunks = list(client.completions.create(**kw, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert len({c.id for c in chunks}) == 1
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
        assert all(c.usage is None for c in chunks[:-1])
    got = client.completions.create(model=name, prompt=short, max_tokens=4, temperature=0,
                                    logprobs=2, extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    # Keys are decoded text: alternatives that decode alike (partial UTF-8) share one key.
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert_workers_idle(*workers)


def test_chat_streams_role_then_content_and_needs_a_chat_template(server, client, workers):
    tok = server.router.model.tokenizer
    messages = [{"role": "user", "content": "hi there"}]
    rendered = tok.encode(tok.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True),
                          add_special_tokens=False)
    want = Engine(MODEL, **ENGINE).generate([rendered], SamplingParams(max_tokens=8,
                                                                       ignore_eos=True))[0]
    name = server.router.model.name
    chunks = list(client.chat.completions.create(
        model=name, messages=messages, max_tokens=8, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == want.text
    assert whole.choices[0].message.role == "assistant"
    scored = client.chat.completions.create(model=name, messages=messages, max_tokens=3,
                                            temperature=0, logprobs=True, top_logprobs=2)
    entries = scored.choices[0].logprobs.content
    assert len(entries) == scored.usage.completion_tokens
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)

    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError, match="chat template"):
            client.chat.completions.create(model=name, messages=messages, stream=True)
    finally:
        tok.chat_template = template
    assert_workers_idle(*workers)


def test_models_lists_the_served_model(server, client):
    assert [m.id for m in client.models.list()] == [server.router.model.name]


@pytest.mark.parametrize(("kw", "error", "says"), [
    ({"temperature": -1.0}, openai.BadRequestError, "temperature"),
    ({"prompt": [1] * 2040, "max_tokens": 100}, openai.BadRequestError, "context"),
    ({"model": "gpt-9"}, openai.NotFoundError, "not served"),
    ({"n": 2}, openai.BadRequestError, "n=2"),
    ({"prompt": [999]}, openai.BadRequestError, "token ids"),
    ({"max_tokens": "many"}, openai.BadRequestError, "max_tokens"),
])
def test_errors_map_to_http_statuses(server, client, workers, kw, error, says):
    args = {"model": server.router.model.name, "prompt": [1, 2, 3], "max_tokens": 2, **kw}
    with pytest.raises(error, match=says) as info:
        client.completions.create(**args)
    assert info.value.body["message"]  # OpenAI's error shape: {"error": {"message", ...}}
    assert_workers_idle(*workers)


def test_malformed_json_capacity_and_auth(server, client):
    status, body = raw(server.url + "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = raw(server.url + "/v1/completions", b'{"prompt": [1]}', token=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert raw(server.url + "/health", token=None)[0] == 200
    assert raw(server.url + "/metrics", token=None)[0] == 401

    limit = server.router.limits.max_in_flight
    server.router.limits.max_in_flight = 0
    try:
        with pytest.raises(openai.RateLimitError, match="in flight"):
            client.completions.create(model=server.router.model.name, prompt=[1], max_tokens=1)
    finally:
        server.router.limits.max_in_flight = limit


def test_a_client_that_disconnects_mid_stream_aborts_its_request(server, client, workers):
    decode = workers[1]
    before = ray.get(decode.info.remote())["finished"].get("abort", 0)
    cancelled = metrics(server.url).get(("baton:request_failures_total",
                                     (("reason", "cancelled"),)), 0)
    stream = client.completions.create(model=server.router.model.name, prompt=ids(2, 40),
                                       max_tokens=1500, stream=True,
                                       extra_body={"ignore_eos": True})
    seen = 0
    for chunk in stream:
        seen += len(chunk.choices[0].text) > 0
        if seen >= 2:
            break
    stream.close()
    assert_workers_idle(decode)
    assert ray.get(decode.info.remote())["finished"]["abort"] == before + 1
    after = metrics(server.url)
    assert after[("baton:request_failures_total", (("reason", "cancelled"),))] == cancelled + 1
    assert after[("baton:num_requests_running", ())] == 0


def test_metrics_move_with_requests_and_two_routers_keep_their_own(server, client, workers):
    name = server.router.model.name
    before = metrics(server.url)
    short, long = ids(3, 5), ids(4, 60)
    for prompt in (short, long):
        client.completions.create(model=name, prompt=prompt, max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=name, prompt=[1], temperature=-1)
    after = metrics(server.url)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("baton:request_success_total", finished_reason="length") == 2
    assert moved("baton:requests_by_path_total", path="local") == 1
    assert moved("baton:requests_by_path_total", path="disaggregated") == 1
    assert moved("baton:prompt_tokens_total") == len(short) + len(long)
    assert moved("baton:generation_tokens_total") == 6
    assert moved("baton:kv_transfer_bytes_total") > 0
    assert moved("baton:time_to_first_token_seconds_count") == 2
    assert moved("baton:time_per_output_token_seconds_count") == 2
    assert moved("baton:e2e_request_latency_seconds_count") == 2
    assert moved("baton:request_failures_total", reason="InvalidRequestError") == 1
    assert after[("baton:num_requests_waiting", ())] == 0
    assert {k[1] for k in after if k[0] == "baton:kv_cache_usage_perc"} and all(
        0 <= v <= 1 for k, v in after.items() if k[0] == "baton:kv_cache_usage_perc")

    # A second router in this process: its own registry, and no decode worker -> unhealthy.
    empty = Server([], [], token=None)
    try:
        assert raw(empty.url + "/health")[0] == 503
        other = metrics(empty.url)
        assert other.get(("baton:request_success_total", (("finished_reason", "length"),)),
                         0) == 0
    finally:
        empty.close()
    assert_workers_idle(*workers)


def test_the_router_actor_counts_grpc_requests_in_its_http_metrics(workers):
    prefill, decode = workers
    settings = RouterSettings(model=MODEL, grpc_port=0, http_port=0, token=TOKEN)
    actor = ray.remote(RouterActor).options(num_cpus=0).remote(settings, [decode], [prefill])
    ports = ray.get(actor.start.remote())
    try:
        url = f"http://127.0.0.1:{ports['http']}"
        with BatonClient(f"127.0.0.1:{ports['grpc']}", token=TOKEN) as grpc_client:
            chunks = list(grpc_client.generate([7, 8, 9], max_tokens=4, ignore_eos=True))
        assert raw(url + "/health", token=None)[0] == 200
        after = metrics(url)
        assert after[("baton:request_success_total", (("finished_reason", "length"),))] == 1
        # One gRPC message per worker chunk: each one's relay is timed, once.
        assert after[("baton:router_relay_seconds_count", ())] == len(chunks)
        assert after[("baton:router_admission_seconds_count", ())] == 1
        assert after[("baton:router_added_ttft_seconds_count", ())] == 1
    finally:
        ray.get(actor.stop.remote())
    assert_workers_idle(*workers)


def test_the_routers_own_time_is_counted_per_request_and_chunk_and_adds_up(server, client,
                                                                          workers):
    name = server.router.model.name
    before = metrics(server.url)
    walls = []
    for prompt in (ids(5, 5), ids(6, 60)):  # prefilled locally / on the prefill worker
        t0 = time.perf_counter()
        events = list(client.completions.create(model=name, prompt=prompt, max_tokens=6,
                                                temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}))
        walls.append(time.perf_counter() - t0)
        assert [e.choices[0].finish_reason for e in events][-1] == "length"
    after = metrics(server.url)

    def moved(name: str, le: str | None = None) -> float:
        key = (name, (("le", le),) if le else ())
        return after.get(key, 0) - before.get(key, 0)

    phases = ("admission", "relay", "added_ttft")
    count = {p: moved(f"baton:router_{p}_seconds_count") for p in phases}
    total = {p: moved(f"baton:router_{p}_seconds_sum") for p in phases}
    assert count["admission"] == count["added_ttft"] == 2
    assert 2 <= count["relay"] <= 2 * 6  # a chunk per request at least, a token each at most
    assert all(total[p] >= 0 for p in phases)
    # The first token's share is admission plus one of the relays, and all of the router's
    # time lies inside the time the client waited.
    assert total["admission"] <= total["added_ttft"] <= total["admission"] + total["relay"]
    assert total["admission"] + total["relay"] <= sum(walls)
    assert_workers_idle(*workers)


@pytest.mark.parametrize(("parse", "body", "says"), [
    (parse_completion, {"prompt": ["a", "b"]}, "one prompt per request"),
    (parse_completion, {"prompt": [[1], [2]]}, "one prompt per request"),
    (parse_completion, {"prompt": [1], "stream_options": {"include_usage": True}}, "stream=true"),
    (parse_completion, {"prompt": [1], "presence_penalty": 0.5}, "presence_penalty"),
    (parse_completion, {"prompt": [1], "echo": True}, "echo"),
    (parse_completion, {"prompt": [1], "temperature": "hot"}, "temperature must be a number"),
    (parse_completion, {}, "prompt is required"),
    (parse_chat, {"messages": []}, "messages is required"),
    (parse_chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "only text parts"),
    (parse_chat, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "logprobs=true"),
])
def test_fields_baton_cannot_honour_are_refused_by_name(parse, body, says):
    with pytest.raises(InvalidRequestError, match=says):
        parse(body)


def test_openai_fields_become_baton_sampling_params():
    req = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}],
                      "max_completion_tokens": 5, "stop": "x", "top_k": -1, "seed": 3,
                      "logprobs": True, "top_logprobs": 2, "stream": True,
                      "stream_options": {"include_usage": True}})
    assert req.prompt == [{"role": "user", "content": "ab"}]
    p = req.params
    assert (p.max_tokens, p.stop, p.top_k, p.seed, p.logprobs, p.temperature) == \
        (5, ["x"], 0, 3, 2, 1.0)
    assert req.stream and req.include_usage and req.logprobs
    assert parse_completion({"prompt": ["hi"]}).prompt == "hi"
    assert parse_completion({"prompt": [1, 2]}).params.max_tokens == 16


@pytest.mark.parametrize(("path", "body", "field", "says"), [
    ("/v1/completions", {"prompt": [1, 2], "temperature": "hot"}, "temperature",
     "temperature must be a number, got 'hot'"),
    ("/v1/completions", {"prompt": [1, 2], "stream": "yes"}, "stream",
     "stream must be true or false, got 'yes'"),
    ("/v1/completions", {"prompt": [1, 2], "n": 3}, "n", "n=3 is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     "messages[0].content", "messages[0].content must be a string or a list of text parts"),
])
def test_a_body_field_of_the_wrong_type_gets_a_400_that_names_it(server, path, body, field,
                                                                 says):
    status, got = raw(server.url + path, json.dumps(body).encode())
    assert status == 400
    assert got["error"]["type"] == "invalid_request_error"
    assert got["error"]["param"] == field
    assert says in got["error"]["message"]


@pytest.mark.parametrize("live", [True, False])
def test_the_journal_has_a_request_accepted_before_it_ends(workers, redis_url, live):
    # Without a decode worker the request fails at once, before the router ever waits.
    state = ClusterState(redis_url, f"journal-order-{live}", background_writes=True)
    prefill, decode = workers
    s = Server([decode] if live else [], [prefill] if live else [], token=None, state=state)
    try:
        body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True}).encode()
        assert raw(s.url + "/v1/completions", body, token=None)[0] == (200 if live else 503)
    finally:
        s.close()
        state.close()  # flushes the queued writes
    events = ClusterState(redis_url, f"journal-order-{live}").events(10)
    assert [e.event for e in events] == ["accepted", "finished" if live else "failed"]
    assert len({e.request_id for e in events}) == 1
