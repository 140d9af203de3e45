"""The chart's options as a platform engineer meets them: Secrets generated or taken from an
existing one, external Redis, the NetworkPolicy around Redis, the flags for ServiceMonitor,
PodDisruptionBudgets and the batch RayJob, and bad values refused with the value named."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from baton.ops.batch import parser as batch_parser
from tests.helm.conftest import MIXED, Rendered, render, render_error, validate

EXTERNAL_URL = "redis://:s3cret@redis.example.internal:6379/2"


def _env(rendered: Rendered) -> dict[str, dict]:
    deployment = rendered.one("Deployment", "-router")
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def _pod_labels(doc: dict) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.fixture(scope="module")
def external_render() -> Rendered:
    return render(sets=(f"redis.external.url={EXTERNAL_URL}",))


@pytest.fixture(scope="module")
def existing_secrets_render() -> Rendered:
    return render(sets=("auth.existingSecret=team-api-token", "redis.existingSecret=team-redis"))


@pytest.fixture(scope="module")
def flags_render() -> Rendered:
    return render(MIXED, sets=("serviceMonitor.enabled=true", "podDisruptionBudget.enabled=true",
                               "batch.enabled=true"))


def test_secrets_are_generated_when_not_given(default_render):
    token = default_render.secret_value("baton-auth", "api-token")
    password = default_render.secret_value("baton-redis", "redis-password")
    assert len(token) >= 32 and len(password) >= 32
    env = _env(default_render)
    assert env["BATON_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "baton-auth",
                                                                  "key": "api-token"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "baton-redis",
                                                                 "key": "redis-password"}
    assert env["BATON_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@baton-redis:6379/0"
    redis = default_render.one("StatefulSet", "-redis")["spec"]["template"]["spec"]
    redis_env = redis["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    assert redis_env == {"name": "baton-redis", "key": "redis-password"}


def test_existing_secrets_are_used_and_none_is_rendered(existing_secrets_render):
    assert existing_secrets_render.all("Secret") == []
    env = _env(existing_secrets_render)
    assert env["BATON_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "team-api-token",
                                                                  "key": "api-token"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "team-redis",
                                                                 "key": "redis-password"}


def test_given_api_token_is_the_secret_value():
    rendered = render(sets=("auth.apiToken=my-token-value",))
    assert rendered.secret_value("baton-auth", "api-token") == "my-token-value"


def test_external_redis_url_replaces_the_statefulset(external_render):
    assert external_render.all("StatefulSet") == []
    assert external_render.all("NetworkPolicy") == []
    assert not [s for s in external_render.all("Service") if s["metadata"]["name"].endswith(
        "-redis")]
    ref = _env(external_render)["BATON_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert external_render.secret_value(ref["name"], ref["key"]) == EXTERNAL_URL
    assert "REDIS_PASSWORD" not in _env(external_render)
    for doc in external_render.docs:
        validate(doc)


def test_network_policy_lets_only_router_and_ray_pods_reach_redis(default_render):
    policy = default_render.one("NetworkPolicy")
    redis = default_render.one("StatefulSet", "-redis")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], _pod_labels(redis))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    selectors = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no namespace or CIDR

    def admitted(labels: dict[str, str]) -> bool:
        return any(_selects(s, labels) for s in selectors)

    ray_cluster = default_render.one("RayCluster")
    name = ray_cluster["metadata"]["name"]
    # KubeRay labels every pod of the cluster with ray.io/cluster=<name>.
    head = {**ray_cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"],
            "ray.io/cluster": name}
    workers = [{**g["template"]["metadata"]["labels"], "ray.io/cluster": name}
               for g in ray_cluster["spec"]["workerGroupSpecs"]]
    assert admitted(_pod_labels(default_render.one("Deployment", "-router")))
    assert admitted(head) and all(admitted(w) for w in workers)
    test_pod = default_render.one("Pod", "-test-completion")["metadata"]["labels"]
    assert not admitted(test_pod)
    assert not admitted({**head, "ray.io/cluster": "another-release"})


def test_redis_keeps_an_append_only_file_on_a_volume_claim(default_render):
    redis = default_render.one("StatefulSet", "-redis")["spec"]
    container = redis["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["--appendonly", "yes"]
    (claim,) = redis["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]


def test_flags_are_off_by_default(default_render):
    kinds = {d["kind"] for d in default_render.docs}
    assert not kinds & {"ServiceMonitor", "PodDisruptionBudget", "RayJob"}


def test_service_monitor_scrapes_the_router_metrics(flags_render):
    monitor = flags_render.one("ServiceMonitor")
    service = flags_render.one("Service", "-router")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "baton-auth", "key": "api-token"}


def test_disruption_budgets_cover_the_router_and_each_pool(flags_render):
    budgets = {b["metadata"]["name"]: b["spec"] for b in flags_render.all("PodDisruptionBudget")}
    assert set(budgets) == {"baton-router", "baton-prefill-h100", "baton-decode-l4"}
    router = flags_render.one("Deployment", "-router")
    assert _selects(budgets["baton-router"]["selector"]["matchLabels"], _pod_labels(router))
    for pool in ("prefill-h100", "decode-l4"):
        assert budgets[f"baton-{pool}"]["selector"]["matchLabels"] == {
            "ray.io/cluster": "baton", "ray.io/group": pool}
        assert budgets[f"baton-{pool}"]["maxUnavailable"] == 1


def test_batch_rayjob_runs_the_batch_module_against_this_release_router(flags_render):
    job = flags_render.one("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "baton.ops.batch"]
    args = batch_parser().parse_args(argv[3:])  # the entrypoint is one the module accepts
    router = flags_render.one("Service", "-router")
    port = router["spec"]["ports"][0]["port"]
    assert args.router == f"{router['metadata']['name']}:{port}"
    head = flags_render.one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["BATON_API_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "api-token"
    assert job["spec"]["clusterSelector"] == {
        "ray.io/cluster": flags_render.one("RayCluster")["metadata"]["name"]}
    for doc in flags_render.docs:
        if doc["kind"] != "ServiceMonitor":  # a Prometheus Operator CRD: no schema here
            validate(doc)


BAD = {
    "no-pools": ({"cluster": {"pools": []}}, "/cluster/pools"),
    "no-decode-pool": ({"cluster": {"pools": [{"name": "prefill", "role": "prefill"}]}},
                       "no pool with role decode or both"),
    "decode-pool-without-replicas": (
        {"cluster": {"pools": [{"name": "decode", "role": "decode", "replicas": 0}]}},
        "no pool with role decode or both"),
    "gpu-count-not-a-number": (
        {"cluster": {"pools": [{"name": "decode", "role": "decode", "num_gpus": "two"}]}},
        "/cluster/pools/0/num_gpus"),
    "unknown-pool-field": (
        {"cluster": {"pools": [{"name": "decode", "role": "decode", "num_gpu": 1}]}},
        "num_gpu"),
    "bad-role": ({"cluster": {"pools": [{"name": "decode", "role": "decoder"}]}},
                 "/cluster/pools/0/role"),
    "placement-for-no-pool": ({"poolPlacement": {"decoder": {"nodeSelector": {"a": "b"}}}},
                              "poolPlacement.decoder"),
    "gpu-type-without-node-label": (
        {"cluster": {"pools": [{"name": "decode", "role": "decode", "device": "cuda",
                                "num_gpus": 1, "accelerator_type": "B300"}]}},
        "cluster.pools[0].accelerator_type \"B300\""),
    "pool-name-not-a-label": ({"cluster": {"pools": [{"name": "Decode_1", "role": "decode"}]}},
                              "cluster.pools[0].name \"Decode_1\""),
    "duplicate-pool-name": ({"cluster": {"pools": [{"name": "decode", "role": "decode"},
                                                   {"name": "decode", "role": "prefill"}]}},
                            "cluster.pools[1].name \"decode\""),
    "cuda-pool-without-gpus": (
        {"cluster": {"pools": [{"name": "decode", "role": "decode", "device": "cuda"}]}},
        "cluster.pools[0].num_gpus"),
    "cpu-cores-pinned": (
        {"cluster": {"pools": [{"name": "decode", "role": "decode", "cpu_cores": [0]}]}},
        "cluster.pools[0].cpu_cores"),
    "redis-url-in-cluster": ({"cluster": {"redis": {"url": "redis://x:6379"}}},
                             "cluster.redis.url"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_fail_naming_the_value(case, tmp_path: Path):
    values, named = BAD[case]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    assert named in render_error(path)
