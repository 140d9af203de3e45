"""Acceleration methods through the public APIs (Ray workers, gRPC, HTTP, Redis).

gRPC `Generate` and the OpenAI HTTP API take a method, give the tokens of `none` (greedy), report
the spec-decode counters on the last chunk / in `usage`, count them in Prometheus, and refuse a
method the pool does not offer by name. `auto` requests are served by the selector's pick and
recorded with their features; a request that names its method bypasses it; routers share the
stored model, pick up a newer one, and a new router starts with it; `baton router stats` and
`train` read and write the same Redis."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import ray
from typer.testing import CliRunner

from baton.actors.worker import Worker, WorkerSpec
from baton.client import BatonClient
from baton.cluster.state import ClusterState
from baton.errors import InvalidRequestError
from baton.ops.cli import app
from baton.records import PerfRecord
from baton.router.app import RouterActor, RouterSettings
from baton.router.selection import SelectionSettings
from baton.router.selector_training import NotEnoughHistory, train
from tests.conftest import wait_until
from tests.router import selector_world as world

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

MODEL = "tiny:llama"
# The decode pool offers prompt lookup and a draft model (the target itself: all accepted).
ENGINE = {"dtype": "float32", "block_size": 8, "num_threads": 1,
          "methods": ["ngram", "draft"], "draft_model": MODEL}
PROMPT = [5, 6, 7, 8, 9] * 6


CLUSTER = "spec-api"


@dataclass
class Served:
    worker: Any
    router: Any  # the RouterActor
    grpc: str
    http: str
    redis_url: str
    state: ClusterState


def start_router(worker: Any, redis_url: str) -> tuple[Any, dict[str, int]]:
    settings = RouterSettings(model=MODEL, grpc_port=0, http_port=0, redis_url=redis_url,
                              cluster=CLUSTER, selection=SelectionSettings(poll_s=0.2))
    actor = ray.remote(RouterActor).options(num_cpus=0).remote(settings, [worker], [])
    return actor, ray.get(actor.start.remote())


@pytest.fixture(scope="module")
def router(ray_local, redis_url):
    spec = WorkerSpec(role="both", model=MODEL, engine=ENGINE, kv_token="tok")
    worker = ray.remote(Worker).options(num_cpus=1).remote(spec)
    ray.get(worker.info.remote())
    actor, ports = start_router(worker, redis_url)
    yield Served(worker, actor, f"127.0.0.1:{ports['grpc']}", f"http://127.0.0.1:{ports['http']}",
                 redis_url, ClusterState(redis_url, CLUSTER))
    ray.get(actor.stop.remote())


def test_grpc_generate_takes_a_method_and_reports_its_counters(router):
    with BatonClient(router.grpc) as client:
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
    history = router.state

    def both_recorded() -> dict[str, PerfRecord] | None:
        records = {r.request_id: r for r in history.history()}
        return records if {fast.request_id, plain.request_id} <= records.keys() else None

    records = wait_until(both_recorded, 30, "both requests in the performance history")
    rec, base = records[fast.request_id], records[plain.request_id]
    assert (rec.method, base.method) == ("draft", "none")
    assert rec.acceptance_rate == 1.0 and base.acceptance_rate is None
    assert rec.forward_passes_per_token < 1 == base.forward_passes_per_token


def test_openai_clients_pass_the_method_in_extra_body(router):
    url = router.http
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


def recorded(state: ClusterState, request_id: str) -> PerfRecord:
    def find() -> PerfRecord | None:
        return next((r for r in state.history(200) if r.request_id == request_id), None)
    return wait_until(find, 30, f"{request_id} in the performance history")


def test_auto_is_the_selectors_and_a_named_method_bypasses_it(router):
    state = router.state
    with BatonClient(router.grpc) as client:
        auto = client.complete(PROMPT, max_tokens=16, ignore_eos=True)  # method unset: auto
        named = client.complete(PROMPT, max_tokens=16, ignore_eos=True, method="ngram")
        plain = client.complete(PROMPT, max_tokens=16, ignore_eos=True, method="none",
                                disable_exploration=True)
    assert auto.token_ids == named.token_ids == plain.token_ids  # lossless, whoever chose
    a, n = recorded(state, auto.request_id), recorded(state, named.request_id)
    assert a.selected_by == "selector" and a.method in ("none", "ngram", "draft")
    assert a.predicted_tokens_per_s and a.pool == "default" and a.model == MODEL
    assert n.selected_by == "request" and n.method == "ngram" and n.predicted_tokens_per_s is None
    # Both carry the features the selector learns from (the named one too).
    for rec in (a, n):
        assert rec.features["lookup_hit_rate"] > 0.5 and rec.features["prompt_tokens"] == 30
        assert "log_pool_in_flight" in rec.features
    with urllib.request.urlopen(router.http + "/metrics", timeout=30) as r:
        text = r.read().decode()
    chosen = [line for line in text.splitlines()
              if line.startswith("baton:method_selected_total")]
    assert chosen and sum(float(line.rsplit(" ", 1)[1]) for line in chosen) >= 1


def test_routers_share_the_stored_model_and_a_new_one_starts_with_it(router):
    state, actor = router.state, router.router
    model = train(world.records([0, 1, 2], 12, ["none", "ngram"]))
    version = state.save_selector_model(model.to_bytes(), records=model.info.records,
                                        trained_at=model.info.trained_at)

    def running_router_has_it() -> bool:
        return ray.get(actor.stats.remote()).get("selector_model_version") == version
    wait_until(running_router_has_it, 30, f"the running router on model v{version}")
    second, _ = start_router(router.worker, router.redis_url)
    try:
        assert ray.get(second.stats.remote())["selector_model_version"] == version
    finally:
        ray.get(second.stop.remote())


def test_router_cli_trains_from_history_and_reports_the_choices(router, tmp_path):
    state, redis_url = router.state, router.redis_url
    with BatonClient(router.grpc) as client:
        for i in range(3):
            client.complete(PROMPT[i:], max_tokens=8, ignore_eos=True)
    runner = CliRunner()
    out = runner.invoke(app, ["router", "stats", "-o", "json", "--redis-url", redis_url,
                              "--cluster", CLUSTER])
    assert out.exit_code == 0, out.output
    stats = json.loads(out.output)
    assert stats["selected"] >= 3 and sum(m["chosen"] for m in stats["methods"].values()) >= 3
    assert stats["model_version"] == state.selector_version()
    # Too little history to learn from is refused with what to do; a file of records works.
    out = runner.invoke(app, ["router", "train", "--redis-url", redis_url, "--cluster", CLUSTER])
    assert isinstance(out.exception, NotEnoughHistory)  # `baton` prints it and exits 2
    assert "training needs" in str(out.exception)
    records = tmp_path / "history.jsonl"
    records.write_text("".join(r.model_dump_json() + "\n"
                               for r in world.records([0, 1], 10, ["none", "ngram"])))
    before = state.selector_version()
    out = runner.invoke(app, ["router", "train", "--from", str(records), "--redis-url",
                              redis_url, "--cluster", CLUSTER])
    assert out.exit_code == 0, out.output
    assert state.selector_version() == before + 1
