"""Acceleration methods through the public APIs: gRPC `Generate` and the OpenAI HTTP API take a
method, give the tokens of `none` (greedy), report the spec-decode counters on the last chunk /
in `usage`, count them in Prometheus, and refuse a method the pool does not offer by name."""

from __future__ import annotations

import urllib.request

import openai
import pytest
import ray

from baton.actors.worker import Worker, WorkerSpec
from baton.client import BatonClient
from baton.cluster.state import ClusterState
from baton.errors import InvalidRequestError
from baton.records import PerfRecord
from baton.router.app import RouterActor, RouterSettings
from tests.conftest import wait_until

MODEL = "tiny:llama"
# The decode pool offers prompt lookup and a draft model (the target itself: all accepted).
ENGINE = {"dtype": "float32", "block_size": 8, "num_threads": 1,
          "methods": ["ngram", "draft"], "draft_model": MODEL}
PROMPT = [5, 6, 7, 8, 9] * 6


@pytest.fixture(scope="module")
def router(ray_local, redis_url):
    spec = WorkerSpec(role="both", model=MODEL, engine=ENGINE, kv_token="tok")
    worker = ray.remote(Worker).options(num_cpus=1).remote(spec)
    ray.get(worker.info.remote())
    settings = RouterSettings(model=MODEL, grpc_port=0, http_port=0, redis_url=redis_url,
                              cluster="spec-api")
    actor = ray.remote(RouterActor).options(num_cpus=0).remote(settings, [worker], [])
    ports = ray.get(actor.start.remote())
    yield f"127.0.0.1:{ports['grpc']}", f"http://127.0.0.1:{ports['http']}", redis_url
    ray.get(actor.stop.remote())


def test_grpc_generate_takes_a_method_and_reports_its_counters(router):
    address, _, redis_url = router
    with BatonClient(address) as client:
        plain = client.complete(PROMPT, max_tokens=24, ignore_eos=True, method="none")
        fast = client.complete(PROMPT, max_tokens=24, ignore_eos=True, method="draft",
                               num_speculative_tokens=4)
        with pytest.raises(InvalidRequestError, match="not offered.*ngram"):
            client.complete(PROMPT, max_tokens=4, method="layerskip")
        with pytest.raises(InvalidRequestError, match="method must be one of"):
            client.complete(PROMPT, max_tokens=4, method="eagle")
    assert fast.token_ids == plain.token_ids
    spec = fast.spec_decode
    assert spec is not None and spec.method == "draft"
    assert spec.num_draft_tokens > 0 and spec.num_accepted_tokens == spec.num_draft_tokens
    assert spec.num_forward_passes < 24
    assert plain.spec_decode is not None and plain.spec_decode.num_draft_tokens == 0
    # The performance history (the selector's training data) says how each request was served.
    history = ClusterState(redis_url, "spec-api")

    def both_recorded() -> dict[str, PerfRecord] | None:
        records = {r.request_id: r for r in history.history()}
        return records if {fast.request_id, plain.request_id} <= records.keys() else None

    records = wait_until(both_recorded, 30, "both requests in the performance history")
    rec, base = records[fast.request_id], records[plain.request_id]
    assert (rec.method, base.method) == ("draft", "none")
    assert rec.acceptance_rate == 1.0 and base.acceptance_rate is None
    assert rec.forward_passes_per_token < 1 == base.forward_passes_per_token


def test_openai_clients_pass_the_method_in_extra_body(router):
    _, url, _ = router
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True})
    fast = client.completions.create(**kw, extra_body={"ignore_eos": True, "method": "ngram",
                                                       "num_speculative_tokens": 3})
    assert fast.choices[0].text == plain.choices[0].text
    spec = fast.usage.model_extra["spec_decode"]
    assert spec["method"] == "ngram" and spec["num_draft_tokens"] > 0
    with pytest.raises(openai.BadRequestError, match="not offered"):
        client.completions.create(**kw, extra_body={"method": "medusa"})
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    drafted = [line for line in text.splitlines()
               if line.startswith("baton:spec_decode_num_draft_tokens_total")
               and 'method="ngram"' in line]
    assert drafted and float(drafted[0].rsplit(" ", 1)[1]) == spec["num_draft_tokens"]
