"""The chart with its default values and with the mixed-GPU example: lint, valid manifests, pools
placed on their GPU types, and a ConfigMap Baton itself parses into the same pools."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from baton.cluster.config import load_config
from tests.helm.conftest import CHART, MIXED, Rendered, helm, load_values, validate


@pytest.mark.parametrize("values", [(), ("-f", str(MIXED))], ids=["default", "mixed-gpu"])
def test_helm_lint_passes(values):
    out = helm("lint", "--strict", str(CHART), *values)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("which", ["default_render", "mixed_render"])
def test_every_rendered_manifest_validates_against_its_schema(which, request):
    rendered: Rendered = request.getfixturevalue(which)
    checked = {f"{d['kind']}/{d['metadata']['name']}": validate(d) for d in rendered.docs}
    kinds = {d["kind"] for d in rendered.docs}
    assert {"RayCluster", "Deployment", "Service", "StatefulSet", "ConfigMap", "Secret",
            "NetworkPolicy", "Pod"} <= kinds, kinds
    assert checked["RayCluster/baton"].startswith("KubeRay CRD")


def _groups(rendered: Rendered) -> dict[str, dict]:
    spec = rendered.one("RayCluster")["spec"]
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _ray_resources(group: dict) -> dict[str, float]:
    """The custom resources a worker group's `ray start --resources` advertises."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(shlex.split(raw)[0]) if raw else {}


def test_mixed_example_puts_prefill_on_h100_and_decode_on_l4(mixed_render):
    groups = _groups(mixed_render)
    assert set(groups) == {"prefill-h100", "decode-l4"}
    for name, gpu, product, replicas in (("prefill-h100", "H100", "NVIDIA-H100-80GB-HBM3", 2),
                                         ("decode-l4", "L4", "NVIDIA-L4", 4)):
        group = groups[name]
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert group["replicas"] == replicas
        assert group["rayStartParams"]["num-gpus"] == "1"
        assert _ray_resources(group) == {f"accelerator_type:{gpu}": 1}
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            pod["tolerations"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Placement overrides from poolPlacement, by pool name.
    prefill = groups["prefill-h100"]["template"]["spec"]["containers"][0]["resources"]
    assert prefill["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    assert groups["decode-l4"]["maxReplicas"] == 8


def test_cpu_pools_ask_for_no_gpu(default_render):
    for group in _groups(default_render).values():
        pod = group["template"]["spec"]
        assert "num-gpus" not in group["rayStartParams"]
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
        assert "nodeSelector" not in pod and "tolerations" not in pod


@pytest.mark.parametrize(("which", "values"), [("default_render", CHART / "values.yaml"),
                                               ("mixed_render", MIXED)])
def test_configmap_parses_with_baton_into_the_values_pools(which, values, request):
    rendered: Rendered = request.getfixturevalue(which)
    text = rendered.one("ConfigMap", "-config")["data"]["cluster.yaml"]
    parsed = load_config(yaml.safe_load(text))
    # What `baton up -c` would make of the same values file (defaults from the chart's values).
    merged = {**load_values(CHART / "values.yaml")["cluster"], **load_values(values)["cluster"]}
    assert parsed == load_config(merged)
    assert [(p.name, p.role, p.accelerator_type, p.num_gpus) for p in parsed.pools] == [
        (p["name"], p["role"], p.get("accelerator_type"), p.get("num_gpus", 0))
        for p in merged["pools"]]
    assert set(_groups(rendered)) == {p.name for p in parsed.pools}


def test_router_serves_grpc_and_http_with_grpc_health_probes(default_render):
    deployment = default_render.one("Deployment", "-router")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}
    command = " ".join(container["args"])
    assert "python -m baton.ops.serve_router --config /etc/baton/cluster.yaml" in command
    assert "ray start --address=baton-head-svc:6379" in command
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert mounts["baton-config"] == "/etc/baton"
    assert volumes["baton-config"]["configMap"]["name"] == (
        default_render.one("ConfigMap", "-config")["metadata"]["name"])
    service = default_render.one("Service", "-router")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports


def test_helm_test_hook_checks_health_and_one_completion_through_the_router(default_render):
    pod = default_render.one("Pod", "-test-completion")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    service = default_render.one("Service", "-router")
    assert env["BATON_ADDRESS"]["value"] == f"{service['metadata']['name']}:50051"
    assert env["BATON_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "baton-auth"
    script = container["args"][0]
    compile(script, "helm-test", "exec")  # the hook's Python at least parses
    assert "HealthStub" in script and ".complete(" in script
