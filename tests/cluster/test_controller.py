"""The controller on real Ray and a real redis-server: pools from config, replacement of killed
workers (pinned cores kept), scale up and down, drain under a running request, typed errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import ray
import redis
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from baton.cluster.config import load_config
from baton.cluster.lifecycle import get_controller, start_controller, stop_controller
from baton.cluster.state import ClusterState
from baton.errors import (
    ClusterNotRunningError,
    ConfigError,
    ModelNotFoundError,
    WorkerNotFoundError,
    WorkerUnavailableError,
)
from baton.sampling import SamplingParams
from tests.conftest import wait_until

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

NAMESPACE = "baton-test"
ENGINE = {"block_size": 8, "num_threads": 1}
OPTIONS = {"tick_s": 0.3, "drain_grace_s": 0.3, "retry_s": 1.0}


def cluster_config(name: str) -> dict[str, Any]:
    return {
        "name": name, "model": "tiny:llama", "prefill_threshold": 8,
        "redis": {"heartbeat_ttl_s": 3.0},
        "pools": [
            {"name": "prefill", "role": "prefill", "cpu_cores": [0], "dtype": "float32",
             "engine": ENGINE},
            {"name": "decode", "role": "decode", "dtype": "float32", "engine": ENGINE},
        ],
    }


@pytest.fixture(scope="module")
def cluster_name() -> str:
    return f"ctl{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def controller(ray_local, redis_url: str, cluster_name: str) -> Iterator[Any]:
    handle = start_controller(load_config(cluster_config(cluster_name)), redis_url,
                              name=cluster_name, namespace=NAMESPACE, **OPTIONS)
    yield handle
    stop_controller(handle, cluster=cluster_name, namespace=NAMESPACE)  # detached


@pytest.fixture(scope="module")
def registry(redis_url: str, cluster_name: str) -> Iterator[ClusterState]:
    state = ClusterState(redis_url, cluster_name, heartbeat_ttl_s=3.0)
    yield state
    state.close()


def workers(controller) -> dict[str, dict[str, Any]]:
    return {w["worker_id"]: w for w in ray.get(controller.workers.remote())}


def registered(registry: ClusterState) -> set[str]:
    return {w.info.worker_id for w in registry.workers()}


def generate(decode, prefill, prompt: list[int], max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    stream = decode.generate.options(num_returns="streaming").remote(
        f"r{uuid.uuid4().hex[:6]}", prompt, params, prefill)
    return [ray.get(ref) for ref in stream][-1]


def died(handle) -> bool:
    """Whether the worker behind `handle` is dead (a call to it says so)."""
    try:
        ray.get(handle.info.remote(), timeout=10)
    except ActorDiedError:
        return True
    except (RayActorError, GetTimeoutError):  # unreachable for now: not known dead yet
        pass
    return False


def settle(controller) -> None:
    assert ray.get(controller.settle.remote(60.0))


def test_pools_come_up_listed_by_role_and_registered(controller, registry) -> None:
    listed = workers(controller)
    assert {i: (w["pool"], w["role"], w["draining"]) for i, w in listed.items()} == {
        "prefill-0": ("prefill", "prefill", False), "decode-0": ("decode", "decode", False)}
    status = {s["worker_id"]: s for s in ray.get(controller.status.remote())}
    assert all(s["alive"] and s["state"] == "ready" for s in status.values())
    assert status["prefill-0"]["cpu_affinity"] == [0]
    assert status["decode-0"]["kv_address"]

    # Registered with what the router needs, and beating with load.
    def beating():
        ws = {w.info.worker_id: w for w in registry.workers() if w.load is not None}
        return ws if {"prefill-0", "decode-0"} <= ws.keys() else None

    shown = wait_until(beating, what="both workers registered and beating")
    assert set(shown) == {"prefill-0", "decode-0"}
    assert shown["decode-0"].info.address == status["decode-0"]["kv_address"]
    assert shown["prefill-0"].info.role == "prefill" and shown["decode-0"].info.pool == "decode"


def test_the_kv_link_secret_is_shown_nowhere(controller, registry, redis_url) -> None:
    secret = ray.get(controller.__ray_call__.remote(lambda c: c._kv_token))
    assert len(secret) >= 24
    shown = [ray.get(controller.status.remote()), ray.get(controller.pools.remote()),
             [{k: v for k, v in w.items() if k != "handle"} for w in workers(controller).values()],
             [ray.get(w["handle"].info.remote()) for w in workers(controller).values()]]
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    for key in raw.scan_iter(f"baton:{registry.cluster}:*"):
        if raw.type(key) == "hash":
            shown.append(raw.hgetall(key))
    assert secret not in json.dumps(shown, default=str)


def test_killed_workers_are_replaced_pinned_and_serving(controller, registry) -> None:
    settle(controller)
    before = workers(controller)
    for w in before.values():
        ray.kill(w["handle"])
    for w in before.values():
        wait_until(lambda h=w["handle"]: died(h), what="the killed worker to be gone")

    def replaced() -> dict[str, dict[str, Any]] | None:
        # Whenever asked, each pool shows its killed worker until a replacement is ready, and
        # once the controller has seen it die, shows it not alive: a worker never silently
        # vanishes from `baton status`.
        status = ray.get(controller.status.remote())
        for pool in ("prefill", "decode"):
            killed = [s for s in status if s["pool"] == pool and s["worker_id"] in before]
            ready = [s for s in status if s["pool"] == pool and s["worker_id"] not in before
                     and s["state"] == "ready"]
            assert killed or ready, status
            assert all(not s["alive"] for s in killed if s["state"] == "dead"), status
        now = workers(controller)
        return now if len(now) == 2 and not set(now) & set(before) else None

    now = wait_until(replaced, 120, "both killed workers replaced")
    assert {w["role"] for w in now.values()} == {"prefill", "decode"}
    [decode] = [w["handle"] for w in now.values() if w["role"] == "decode"]
    [prefill] = [w["handle"] for w in now.values() if w["role"] == "prefill"]
    assert ray.get(prefill.info.remote())["cpu_affinity"] == [0]  # the dead replica's cores

    out = generate(decode, prefill, list(range(40)), max_tokens=6)  # long: prefilled remotely
    assert out.finished and len(out.token_ids) == 6
    assert ray.get(decode.info.remote())["handoffs"] == 1
    assert [p["restarts"] for p in ray.get(controller.pools.remote())] == [1, 1]
    wait_until(lambda: registered(registry) == set(now), what="the replacements registered")


def test_scale_up_and_down(controller, registry) -> None:
    settle(controller)
    assert ray.get(controller.scale.remote("decode", 2)) == 2
    settle(controller)
    decodes = [i for i, w in workers(controller).items() if w["role"] == "decode"]
    assert len(decodes) == 2
    wait_until(lambda: set(decodes) <= registered(registry), what="both decodes registered")

    assert ray.get(controller.scale.remote("decode", 1)) == 1
    settle(controller)
    left = [i for i, w in workers(controller).items() if w["role"] == "decode"]
    assert len(left) == 1 and left[0] in decodes
    wait_until(lambda: not set(decodes) - set(left) & registered(registry),
               what="the drained decode deregistered")

    with pytest.raises(ConfigError, match="cpu_cores"):  # pinned to one core
        ray.get(controller.scale.remote("prefill", 2))
    with pytest.raises(ConfigError, match="no pool named 'gpu'"):
        ray.get(controller.scale.remote("gpu", 1))
    with pytest.raises(ConfigError, match=">= 0"):
        ray.get(controller.scale.remote("decode", -1))


def test_drain_lets_the_running_request_finish(controller, registry) -> None:
    settle(controller)
    [(worker_id, w)] = [(i, w) for i, w in workers(controller).items() if w["role"] == "decode"]
    params = SamplingParams(max_tokens=600, ignore_eos=True)
    stream = w["handle"].generate.options(num_returns="streaming").remote(
        "long", [1, 2, 3], params, None)
    first = ray.get(next(stream))
    assert not first.finished

    assert ray.get(controller.drain.remote(worker_id)) == 1
    assert worker_id not in workers(controller)  # routers stop sending at once
    draining = ray.get(controller.workers.remote(include_draining=True))
    assert [d["draining"] for d in draining if d["worker_id"] == worker_id] == [True]

    outs = [ray.get(ref) for ref in stream]
    assert outs[-1].finished and len(outs[-1].token_ids) == 600

    # Then it goes away and a replacement takes its place.
    settle(controller)
    decodes = [i for i, w in workers(controller).items() if w["role"] == "decode"]
    assert len(decodes) == 1 and decodes != [worker_id]
    with pytest.raises(RayActorError):
        ray.get(w["handle"].info.remote(), timeout=10)
    wait_until(lambda: worker_id not in registered(registry) and decodes[0] in registered(registry),
               what="the drained worker's replacement registered in its place")


def test_unknown_worker_missing_controller_and_duplicate_name(controller, cluster_name,
                                                               redis_url) -> None:
    with pytest.raises(WorkerNotFoundError, match="decode-99"):
        ray.get(controller.drain.remote("decode-99"))
    assert get_controller(cluster_name, NAMESPACE)._actor_id == controller._actor_id
    with pytest.raises(ClusterNotRunningError, match="baton up"):
        get_controller("no-such-controller", NAMESPACE)
    with pytest.raises(ConfigError, match="already runs"):
        start_controller(load_config(cluster_config(cluster_name)), redis_url,
                         name=cluster_name, namespace=NAMESPACE)


def test_a_pool_that_cannot_start_fails_start_with_the_workers_error(ray_local) -> None:
    config = load_config({"model": "tiny:nope", "pools": [
        {"name": "both", "role": "both", "dtype": "float32", "engine": ENGINE}]})
    with pytest.raises(ModelNotFoundError, match="worker both-0 .* did not start: no tiny"):
        start_controller(config, None, name="doomed", namespace=NAMESPACE)
    with pytest.raises(ClusterNotRunningError):  # nothing left behind
        get_controller("doomed", NAMESPACE)


def test_a_worker_the_cluster_cannot_place_times_out_clearly(ray_local) -> None:
    config = load_config({"model": "tiny:llama", "pools": [
        {"name": "tpu", "role": "both", "accelerator_type": "TPU-V9", "engine": ENGINE}]})
    with pytest.raises(WorkerUnavailableError, match="accelerator_type:TPU-V9.*ray status"):
        start_controller(config, None, name="unplaced", namespace=NAMESPACE, start_timeout_s=1.0)
    with pytest.raises(ClusterNotRunningError):
        get_controller("unplaced", NAMESPACE)
