"""Method selection through a real router (Ray workers, gRPC, HTTP, Redis): `auto` requests are
served by the selector's pick and recorded with their features; a request that names its method
bypasses it; routers share the stored model, pick up a newer one, and a new router starts with it;
Prometheus counts the choices; `baton router stats` and `train` read and write the same Redis."""

from __future__ import annotations

import json
import urllib.request

import pytest
import ray
from typer.testing import CliRunner

from baton.actors.worker import Worker, WorkerSpec
from baton.client import BatonClient
from baton.cluster.state import ClusterState
from baton.ops.cli import app
from baton.records import PerfRecord
from baton.router.app import RouterActor, RouterSettings
from baton.router.selection import SelectionSettings
from baton.router.selector_training import NotEnoughHistory, train
from tests.conftest import wait_until
from tests.router import selector_world as world

MODEL = "tiny:llama"
ENGINE = {"dtype": "float32", "block_size": 8, "num_threads": 1, "methods": ["ngram"]}
PROMPT = [5, 6, 7, 8, 9] * 6
CLUSTER = "sel-api"


def start_router(worker, redis_url: str):
    settings = RouterSettings(model=MODEL, grpc_port=0, http_port=0, redis_url=redis_url,
                              cluster=CLUSTER, selection=SelectionSettings(poll_s=0.2))
    actor = ray.remote(RouterActor).options(num_cpus=0).remote(settings, [worker], [])
    ports = ray.get(actor.start.remote())
    return actor, ports


@pytest.fixture(scope="module")
def cluster(ray_local, redis_url):
    spec = WorkerSpec(role="both", model=MODEL, engine=ENGINE, kv_token="tok")
    worker = ray.remote(Worker).options(num_cpus=1).remote(spec)
    ray.get(worker.info.remote())
    actor, ports = start_router(worker, redis_url)
    yield worker, actor, ports, ClusterState(redis_url, CLUSTER)
    ray.get(actor.stop.remote())


def recorded(state: ClusterState, request_id: str) -> PerfRecord:
    def find() -> PerfRecord | None:
        return next((r for r in state.history(200) if r.request_id == request_id), None)
    return wait_until(find, 30, f"{request_id} in the performance history")


def test_auto_is_the_selectors_and_a_named_method_bypasses_it(cluster):
    _, _, ports, state = cluster
    with BatonClient(f"127.0.0.1:{ports['grpc']}") as client:
        auto = client.complete(PROMPT, max_tokens=16, ignore_eos=True)  # method unset: auto
        named = client.complete(PROMPT, max_tokens=16, ignore_eos=True, method="ngram")
        plain = client.complete(PROMPT, max_tokens=16, ignore_eos=True, method="none",
                                disable_exploration=True)
    assert auto.token_ids == named.token_ids == plain.token_ids  # lossless, whoever chose
    a, n = recorded(state, auto.request_id), recorded(state, named.request_id)
    assert a.selected_by == "selector" and a.method in ("none", "ngram")
    assert a.predicted_tokens_per_s and a.pool == "default" and a.model == MODEL
    assert n.selected_by == "request" and n.method == "ngram" and n.predicted_tokens_per_s is None
    # Both carry the features the selector learns from (the named one too).
    for rec in (a, n):
        assert rec.features["lookup_hit_rate"] > 0.5 and rec.features["prompt_tokens"] == 30
        assert "log_pool_in_flight" in rec.features
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/metrics", timeout=30) as r:
        text = r.read().decode()
    chosen = [line for line in text.splitlines()
              if line.startswith("baton:method_selected_total")]
    assert chosen and sum(float(line.rsplit(" ", 1)[1]) for line in chosen) >= 1


def test_routers_share_the_stored_model_and_a_new_one_starts_with_it(cluster, redis_url):
    worker, actor, _, state = cluster
    model = train(world.records([0, 1, 2], 12, ["none", "ngram"]))
    version = state.save_selector_model(model.to_bytes(), records=model.info.records,
                                        trained_at=model.info.trained_at)

    def running_router_has_it() -> bool:
        return ray.get(actor.stats.remote()).get("selector_model_version") == version
    wait_until(running_router_has_it, 30, f"the running router on model v{version}")
    second, _ = start_router(worker, redis_url)
    try:
        assert ray.get(second.stats.remote())["selector_model_version"] == version
    finally:
        ray.get(second.stop.remote())


def test_router_cli_trains_from_history_and_reports_the_choices(cluster, redis_url, tmp_path):
    _, _, ports, state = cluster
    with BatonClient(f"127.0.0.1:{ports['grpc']}") as client:
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
