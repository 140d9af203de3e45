"""The client gRPC API end to end: a router actor in front of real workers (tiny model, real Ray,
real gRPC), driven through `baton.client`."""

from __future__ import annotations

import importlib.metadata
import json
import random
import threading

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.actors.engine import Engine
from baton.actors.worker import Worker, WorkerSpec
from baton.client import AsyncBatonClient, BatonClient, Completion, build_request
from baton.errors import (
    AuthError,
    CapacityError,
    DeadlineError,
    InvalidRequestError,
    ModelNotFoundError,
    WorkerUnavailableError,
)
from baton.ops import batch
from baton.router.app import RouterActor, RouterSettings
from baton.router.grpc_server import sampling_from_proto
from baton.sampling import SamplingParams
from tests.conftest import assert_workers_idle, wait_until

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

MODEL = "tiny:llama"
ENGINE = {"dtype": "float32", "block_size": 8, "num_threads": 1}


def spawn(role: str):
    spec = WorkerSpec(role=role, model=MODEL, engine=ENGINE, kv_token="tok", prefill_threshold=16)
    actor = ray.remote(Worker).options(num_cpus=1).remote(spec)
    ray.get(actor.info.remote())
    return actor


def start_router(workers, **kw):
    prefill, decode = workers
    settings = RouterSettings(model=MODEL, grpc_port=0, http_port=None, **kw)
    actor = ray.remote(RouterActor).options(num_cpus=0).remote(settings, [decode], [prefill])
    port = ray.get(actor.start.remote())["grpc"]
    return actor, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def workers(ray_local):
    return spawn("prefill"), spawn("decode")


@pytest.fixture(scope="module")
def api(workers):
    actor, address = start_router(workers)
    with BatonClient(address) as client:
        yield client, address
    ray.get(actor.stop.remote())


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 256) for _ in range(n)]


def test_generate_streams_what_one_engine_computes_over_both_paths(api, workers):
    client, _ = api
    short, long = ids(0, 6), ids(1, 70)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [o for o in Engine(MODEL, **ENGINE).generate([short, long], params)]
    for prompt, want, path in ((short, expected[0], "local"), (long, expected[1],
                                                                  "disaggregated")):
        chunks = list(client.generate(prompt, max_tokens=12, ignore_eos=True))
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in chunks) == want.text
        assert chunks[0].path == path and chunks[-1].finish_reason == "length"
        assert chunks[-1].prompt_tokens == len(prompt) and chunks[-1].completion_tokens == 12
        assert all(c.finish_reason is None for c in chunks[:-1])
    text = client.complete("hello there", max_tokens=5, ignore_eos=True)
    assert text.completion_tokens == 5 and text.text
    assert_workers_idle(*workers)


@pytest.mark.parametrize(("kw", "error", "says"), [
    ({"prompt": [1, 2], "temperature": -1.0}, InvalidRequestError, "temperature"),
    ({"prompt": [1, 2], "top_p": 0.0}, InvalidRequestError, "top_p"),
    ({"prompt": [1] * 2040, "max_tokens": 100}, InvalidRequestError, "context"),
    ({"prompt": [1, 2], "model": "gpt-9"}, ModelNotFoundError, "not served"),
    ({"prompt": ""}, InvalidRequestError, "empty"),
    ({"prompt": [300]}, InvalidRequestError, "token ids"),
    ({"prompt": [{"role": "robot", "content": "hi"}]}, InvalidRequestError, "role"),
    ({"prompt": [1, 2], "request_id": "x" * 300}, InvalidRequestError, "request_id"),
    ({"prompt": [1, 2], "logprobs": 99}, InvalidRequestError, "logprobs"),
])
def test_bad_requests_get_a_clear_status_and_the_cluster_keeps_serving(api, workers, kw, error,
                                                                        says):
    client, _ = api
    prompt = kw.pop("prompt")
    with pytest.raises(error, match=says):
        client.complete(prompt, **kw)
    assert client.complete([5, 6, 7], max_tokens=3, ignore_eos=True).completion_tokens == 3
    assert_workers_idle(*workers)


def test_a_client_that_cancels_frees_the_request_in_its_worker(api, workers):
    client, _ = api
    decode = workers[1]
    before = ray.get(decode.info.remote())["finished"].get("abort", 0)
    stream = client.generate(ids(2, 40), max_tokens=1500, ignore_eos=True)
    next(stream)
    stream.close()
    assert_workers_idle(*workers)
    assert ray.get(decode.info.remote())["finished"]["abort"] == before + 1


def test_a_deadline_stops_the_request_and_says_so(api, workers):
    client, _ = api
    with pytest.raises(DeadlineError):
        client.complete(ids(3, 10), max_tokens=1900, ignore_eos=True, timeout_s=0.5)
    assert_workers_idle(*workers)


def test_abort_from_another_connection_ends_the_stream(api, workers):
    client, address = api
    stream = client.generate(ids(4, 10), max_tokens=1500, ignore_eos=True, request_id="stop-me")
    first = next(stream)
    assert first.request_id == "stop-me"
    with BatonClient(address) as other:
        assert other.abort("stop-me") is True
        assert other.abort("never-was") is False
    assert [c.finish_reason for c in stream][-1] == "abort"
    assert_workers_idle(*workers)


def test_a_full_router_answers_resource_exhausted(workers):
    actor, address = start_router(workers, max_in_flight=1)
    with BatonClient(address) as client:
        stream = client.generate(ids(5, 10), max_tokens=1500, ignore_eos=True)
        next(stream)
        with pytest.raises(CapacityError, match="retry"):
            client.complete([1, 2, 3], max_tokens=2)
        stream.close()
    ray.get(actor.stop.remote())
    assert_workers_idle(*workers)


def test_health_reflection_and_server_info(api):
    client, address = api
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    names = {s.name for s in resp.list_services_response.service}
    assert {"baton.v1.Baton", "baton.v1.Admin", "grpc.health.v1.Health"} <= names
    channel.close()
    info = client.server_info()
    assert info.decode_workers == 1 and info.prefill_workers == 1
    assert info.version == importlib.metadata.version("baton")  # the installed package's
    assert client.models() == [info.models[0]]


def test_token_auth_refuses_strangers_but_not_health_checks(workers):
    actor, address = start_router(workers, token="s3cret")
    with BatonClient(address) as stranger, pytest.raises(AuthError, match="token"):
        stranger.complete([1, 2], max_tokens=2)
    with BatonClient(address, token="wrong") as wrong, pytest.raises(AuthError):
        wrong.models()
    with BatonClient(address, token="s3cret") as friend:
        assert friend.complete([1, 2], max_tokens=2).completion_tokens == 2
    channel = grpc.insecure_channel(address)
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    channel.close()
    ray.get(actor.stop.remote())


def test_two_routers_serve_the_same_workers_at_once(api, workers):
    _, address = api
    actor, address2 = start_router(workers)
    prompts = [ids(10 + i, 30 + 10 * i) for i in range(6)]
    want = [o.token_ids for o in Engine(MODEL, **ENGINE).generate(
        prompts, SamplingParams(max_tokens=6, ignore_eos=True))]
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        with BatonClient(address if i % 2 else address2) as c:
            got[i] = c.complete(prompts[i], max_tokens=6, ignore_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(6)] == want
    ray.get(actor.stop.remote())
    assert_workers_idle(*workers)


def test_async_client_streams_too(api):
    import asyncio

    _, address = api

    async def run():
        async with AsyncBatonClient(address) as client:
            chunks = [c async for c in client.generate([1, 2, 3], max_tokens=4,
                                                       ignore_eos=True)]
            return chunks, await client.models()

    chunks, models = asyncio.run(run())
    assert sum(len(c.token_ids) for c in chunks) == 4 and models


def test_chat_messages_go_through_the_model_chat_template(api):
    client, _ = api
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    engine = Engine(MODEL, **ENGINE)
    prompt = engine.tokenizer.encode(engine.apply_chat_template(messages),
                                     add_special_tokens=False)
    want = engine.generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    got = client.complete(messages, max_tokens=5, ignore_eos=True)
    assert got.token_ids == want.token_ids and got.prompt_tokens == len(prompt)


MAX_MODEL_LEN = 2048  # the tiny model's context
sampling_fields = st.fixed_dictionaries({}, optional={
    # Outputs short enough to run every example, or longer than the context (refused at once).
    "max_tokens": st.one_of(st.integers(0, 16), st.integers(MAX_MODEL_LEN + 1, 3000)),
    "temperature": st.one_of(st.floats(-2, 5), st.just(float("nan"))),
    "top_p": st.one_of(st.floats(-1, 2), st.just(float("nan"))),
    "top_k": st.integers(-5, 300),
    "seed": st.integers(-(2**62), 2**62),
    "stop": st.lists(st.text(max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 400), max_size=3),
    "logprobs": st.integers(0, 40),
    "request_id": st.text(max_size=20),
    "model": st.sampled_from(["", "nope"]),
})
prompts = st.one_of(
    st.text(max_size=40),
    st.lists(st.integers(0, 400), max_size=40),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                    "content": st.text(max_size=20)}), max_size=3),
)
CLEAR = (InvalidRequestError, ModelNotFoundError, CapacityError)
# What a refusal names, so the caller knows what to change.
FIELDS = ("prompt", "token ids", "messages", "max_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "logprobs", "request_id", "model", "retry")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts, kw=sampling_fields)
def test_fuzzed_requests_get_a_result_or_a_clear_status(api, workers, prompt, kw):
    client, _ = api
    try:
        params = sampling_from_proto(build_request(prompt, **kw).sampling)
    except InvalidRequestError:
        params = None
    try:
        out = client.complete(prompt, timeout_s=60, **kw)
    except CLEAR as exc:
        assert any(f in exc.message for f in FIELDS), exc.message
    else:
        assert params is not None  # what the engine would refuse is never run
        max_tokens = params.max_tokens
        assert out.completion_tokens == len(out.token_ids) <= max_tokens
        assert out.finish_reason == "stop" or (out.finish_reason == "length"
                                               and out.completion_tokens == max_tokens)
    for w in workers:
        assert ray.get(w.block_violations.remote()) == []


def self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "baton-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_pem


def test_tls_serves_clients_that_trust_the_certificate_only(workers, tmp_path):
    cert = self_signed(tmp_path)
    actor, address = start_router(workers, tls_cert_file=str(tmp_path / "cert.pem"),
                                  tls_key_file=str(tmp_path / "key.pem"))
    with BatonClient(address, root_certificates=cert) as client:
        assert client.complete([1, 2, 3], max_tokens=2).completion_tokens == 2
    with BatonClient(address) as plain, pytest.raises(WorkerUnavailableError):
        plain.complete([1, 2, 3], max_tokens=2, timeout_s=10)
    ray.get(actor.stop.remote())


def test_a_router_killed_mid_stream_ends_it_clearly_and_a_new_router_serves(workers):
    actor, address = start_router(workers)
    with BatonClient(address) as client:
        stream = client.generate(ids(6, 10), max_tokens=300, ignore_eos=True)
        next(stream)
        ray.kill(actor)
        with pytest.raises(WorkerUnavailableError, match="UNAVAILABLE"):
            list(stream)
    # The orphaned request is aborted in its worker (its stream's connection closes), freeing
    # its blocks.
    assert_workers_idle(*workers)
    actor2, address2 = start_router(workers)
    with BatonClient(address2) as client:
        assert client.complete([1, 2, 3], max_tokens=3).completion_tokens == 3
    ray.get(actor2.stop.remote())


def test_a_batch_file_runs_through_the_router_with_its_token(workers, tmp_path):
    """`python -m baton.ops.batch` against a router: results in input order, the same text a
    client gets for the same greedy request, a bad row answered in its place, no token refused."""
    actor, address = start_router(workers, token="s3cret")
    rows = [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 6, "temperature": 0}},
            {"custom_id": "long", "prompt": "one two three four five six seven eight nine ten "
             "eleven twelve thirteen fourteen", "max_tokens": 5, "ignore_eos": True},
            {"custom_id": "bad", "prompt": "x", "max_tokens": -2},
            {"custom_id": "short", "prompt": "hello there", "max_tokens": 5, "ignore_eos": True}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    try:
        with pytest.raises(AuthError):
            batch.run([str(source), "--output", str(out), "--router", address])
        report = batch.run([str(source), "--output", str(out), "--router", address,
                            "--token", "s3cret", "--concurrency", "3"])
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["custom_id"] for line in lines] == ["chat", "long", "bad", "short"]
        assert (report.written, report.errors) == (4, 1)
        bad = lines[2]
        assert bad["response"]["status_code"] == 400 and "max_tokens" in bad["error"]["message"]
        with BatonClient(address, token="s3cret") as client:
            for line, row in zip(lines[1::2], rows[1::2], strict=True):
                want = client.complete(row["prompt"], max_tokens=5, ignore_eos=True)
                body = line["response"]["body"]
                assert body["choices"][0]["text"] == want.text
                assert body["usage"]["completion_tokens"] == 5
        assert lines[0]["response"]["body"]["object"] == "chat.completion"
    finally:
        ray.get(actor.stop.remote())
    assert_workers_idle(*workers)


@pytest.mark.parametrize("transport", ["grpc", "ray"])
def test_the_requests_of_a_dead_router_are_aborted_and_another_routers_are_not(workers,
                                                                               transport):
    decode = workers[1]
    doomed, doomed_at = start_router(workers, worker_transport=transport)
    kept, kept_at = start_router(workers, worker_transport=transport)
    before = ray.get(decode.info.remote())
    aborted_before = before["finished"].get("abort", 0)
    outcomes: dict[str, object] = {}

    def complete(name: str, address: str) -> None:
        with BatonClient(address) as client:
            try:
                outcomes[name] = client.complete(ids(8, 10), max_tokens=2000, ignore_eos=True)
            except WorkerUnavailableError as exc:
                outcomes[name] = exc

    def running() -> int:
        return ray.get(decode.info.remote())["num_running"]

    threads = [threading.Thread(target=complete, args=args)
               for args in (("doomed", doomed_at), ("kept", kept_at))]
    threads[0].start()
    wait_until(lambda: running() == 1, 60, "the doomed router's request")
    threads[1].start()
    wait_until(lambda: running() == 2, 60, "both requests decoding")
    ray.kill(doomed)
    # The later request, as long, still decodes: the dead router's one was cut short.
    wait_until(lambda: running() == 1, 60, "the dead router's request aborted")
    info = ray.get(decode.info.remote())
    assert info["finished"].get("abort", 0) == aborted_before + 1 and "kept" not in outcomes
    # Over Ray its lease lapsed; over the request link, the dead router's connection closing
    # cancelled it at once.
    expired = info["lease_expiries"] - before["lease_expiries"]
    assert expired >= 1 if transport == "ray" else expired == 0
    for t in threads:
        t.join(300)
    assert isinstance(outcomes["doomed"], WorkerUnavailableError)
    kept_out = outcomes["kept"]
    assert isinstance(kept_out, Completion)
    assert kept_out.finish_reason == "length" and kept_out.completion_tokens == 2000
    assert_workers_idle(*workers)
    assert ray.get(decode.info.remote())["kv_usage"] == 0
    ray.get(kept.stop.remote())
