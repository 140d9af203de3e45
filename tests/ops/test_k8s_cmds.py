"""`baton k8s` against a recorded Kubernetes API (test double at the HTTP boundary) built from the
chart's own rendered manifests, and a router's Admin service (test double from the stubs).

The CLI runs in-process through its real entry point (`baton.ops.cli.main`), so errors are
checked as an operator sees them: exit code 2, a typed error, no traceback.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from baton.cluster.k8s import release_fullname
from baton.ops import cli
from tests.helm.conftest import CHART, helm
from tests.ops.admin_double import MOE_CACHE, AdminDouble, worker
from tests.ops.k8s_recorded_api import (
    JSON_PATCH,
    NAMESPACE,
    RecordedKubeAPI,
    chart_cluster,
    write_kubeconfig,
)

RC = "prod-baton"  # the chart's fullname for release "prod"


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def said(self) -> str:
        """stdout and stderr with rich's line wrapping undone."""
        return " ".join((self.out + " " + self.err).split())


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordedKubeAPI]:
    api = chart_cluster("prod").start()
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", api.url)))
    for var in ("KUBERNETES_SERVICE_HOST", "BATON_ROUTER", "BATON_API_TOKEN", "BATON_RELEASE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    yield api
    api.stop()


@pytest.fixture
def router(kube: RecordedKubeAPI) -> Iterator[AdminDouble]:
    secret = kube.objects[f"/api/v1/namespaces/{NAMESPACE}/secrets/{RC}-auth"]
    token = base64.b64decode(secret["data"]["api-token"]).decode()
    admin = AdminDouble(token, [worker("decode-l4-0", "decode-l4", "decode", running=4,
                                       expert_cache=MOE_CACHE),
                                worker("prefill-h100-0", "prefill-h100", "prefill")]).start()
    yield admin
    admin.stop()


def baton(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
          *args: str) -> Run:
    monkeypatch.setattr(sys, "argv", ["baton", "k8s", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return Run(int(exit_.value.code or 0), captured.out, captured.err)


def group(api: RecordedKubeAPI, pool: str) -> dict:
    return next(g for g in api.raycluster(RC)["spec"]["workerGroupSpecs"]
                if g["groupName"] == pool)


def test_status_joins_the_raycluster_its_pods_and_the_router(kube, router, capsys,
                                                             monkeypatch):
    res = baton(capsys, monkeypatch, "status", "--release", "prod", "--router", router.address)
    assert res.code == 0, res.said
    said = res.said
    assert f"RayCluster {RC} (release prod, namespace {NAMESPACE}): ready, 5/6 Ray workers" in said
    assert "decode-l4 │ decode │ 4 │ 4-8 │ 3/4" in said
    assert "prefill-h100 │ prefill │ 2 │ 2-2 │ 2/2" in said
    assert f"{RC}-decode-l4-worker-00003 │ ray-worker │ decode-l4 │ Pending │ no" in said
    assert f"{RC}-router-6d8f9c7b5-qk4zt │ router │ │ Running │ yes │ 1" in said
    # The router answered with the token read from the chart's Secret.
    assert f"Baton workers (router {router.address})" in said
    assert "decode-l4-0 │ decode-l4 │ decode │ ready │ 4" in said
    assert "25.0% │ 75% hit, 4.0 MiB loaded, 0.50s stall" in said  # its offloaded experts
    assert "queue 3, in flight 7" in said
    selectors = {r["query"].get("labelSelector") for r in kube.requests
                 if r["path"].endswith("/pods")}
    assert selectors == {"app.kubernetes.io/name=baton,app.kubernetes.io/instance=prod"}


def test_status_json_without_a_reachable_router_still_reports_kubernetes(kube, capsys,
                                                                         monkeypatch):
    res = baton(capsys, monkeypatch, "status", "-r", "prod", "-o", "json")
    assert res.code == 0, res.said
    report = json.loads(res.out)
    assert report["raycluster"] == {"name": RC, "state": "ready", "reason": None,
                                    "ready_workers": 5, "desired_workers": 6}
    pools = {p["pool"]: (p["replicas"], p["ready_pods"], p["pods"]) for p in report["pools"]}
    assert pools == {"prefill-h100": (2, 2, 2), "decode-l4": (4, 3, 4)}
    assert len(report["pods"]) == 9  # head, 6 workers, router, redis
    r = report["router"]
    assert r["reachable"] is False and r["workers"] == []
    # The Service is ClusterIP: say how to reach it.
    assert f"kubectl port-forward -n {NAMESPACE} svc/{RC}-router 50051:50051" in r["error"]
    assert "--router 127.0.0.1:50051" in r["error"]


def test_status_says_why_a_router_did_not_answer(kube, capsys, monkeypatch):
    res = baton(capsys, monkeypatch, "status", "-r", "prod", "--router", "127.0.0.1:1",
                "--token", "t")
    assert res.code == 0, res.said
    assert "router not reached at 127.0.0.1:1: WorkerUnavailableError: router at 127.0.0.1:1 " \
           "did not answer" in res.said
    assert "5/6 Ray workers ready" in res.said


def test_scale_patches_that_worker_group_only_and_sets_the_controller_target(
        kube, router, capsys, monkeypatch):
    prefill_before = group(kube, "prefill-h100")
    res = baton(capsys, monkeypatch, "scale", "decode-l4", "10", "-r", "prod",
                "--router", router.address, "-o", "json")
    assert res.code == 0, res.said
    out = json.loads(res.out)
    assert (out["before"], out["replicas"], out["max_replicas"]) == (4, 10, 10)
    assert out["controller"] == {"reachable": True, "replicas": 10, "error": None}
    decode = group(kube, "decode-l4")
    assert (decode["replicas"], decode["minReplicas"], decode["maxReplicas"]) == (10, 4, 10)
    assert group(kube, "prefill-h100") == prefill_before
    assert router.calls == [("scale", ("decode-l4", 10))]
    patches = [r for r in kube.requests if r["verb"] == "PATCH"]
    assert [p["content_type"] for p in patches] == [JSON_PATCH]
    assert patches[0]["path"] == f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters/{RC}"

    # Below minReplicas: KubeRay only accepts it with minReplicas lowered too.
    res = baton(capsys, monkeypatch, "scale", "decode-l4", "1", "-r", "prod",
                "--router", router.address)
    assert res.code == 0, res.said
    assert "pool decode-l4: 10 -> 1 replicas" in res.said
    decode = group(kube, "decode-l4")
    assert (decode["replicas"], decode["minReplicas"], decode["maxReplicas"]) == (1, 1, 10)


def test_scale_without_a_router_patches_and_says_the_controller_was_not_told(
        kube, capsys, monkeypatch):
    res = baton(capsys, monkeypatch, "scale", "prefill-h100", "3", "-r", "prod")
    assert res.code == 0, res.said
    assert group(kube, "prefill-h100")["replicas"] == 3
    assert "Baton's controller was not told" in res.said and "port-forward" in res.said


def test_scale_refuses_an_unknown_pool_or_a_negative_count_before_changing_anything(
        kube, router, capsys, monkeypatch):
    res = baton(capsys, monkeypatch, "scale", "decode", "3", "-r", "prod",
                "--router", router.address)
    assert res.code == 2
    assert "ConfigError: no pool 'decode' in RayCluster prod-baton; its pools: prefill-h100, " \
           "decode-l4" in res.said
    res = baton(capsys, monkeypatch, "scale", "-r", "prod", "--router", router.address, "--",
                "decode-l4", "-1")
    assert res.code == 2 and "replicas -1: give 0 or more" in res.said
    assert not [r for r in kube.requests if r["verb"] == "PATCH"] and router.calls == []


def test_drain_goes_through_the_routers_admin_service(kube, router, capsys, monkeypatch):
    res = baton(capsys, monkeypatch, "drain", "decode-l4-0", "-r", "prod",
                "--router", router.address)
    assert res.code == 0, res.said
    assert "draining decode-l4-0: 2 requests still in flight" in res.said
    res = baton(capsys, monkeypatch, "drain", "decode-l4-9", "-r", "prod",
                "--router", router.address)
    assert res.code == 2
    assert "WorkerNotFoundError: no worker 'decode-l4-9'" in res.said
    assert router.calls == [("drain", "decode-l4-0"), ("drain", "decode-l4-9")]


def test_logs_print_a_components_pods(kube, capsys, monkeypatch):
    router_pod = f"{RC}-router-6d8f9c7b5-qk4zt"
    kube.logs[(router_pod, "router")] = "starting\nserving gRPC on 0.0.0.0:50051\nready\n"
    for i in range(4):
        kube.logs[(f"{RC}-decode-l4-worker-{i:05d}", "ray-worker")] = f"decode {i} up\n"
    res = baton(capsys, monkeypatch, "logs", "-r", "prod", "--tail", "2")
    assert res.code == 0, res.said
    assert res.out == "serving gRPC on 0.0.0.0:50051\nready\n"
    res = baton(capsys, monkeypatch, "logs", "-r", "prod", "-c", "decode-l4", "--follow")
    assert res.code == 0, res.said
    assert sorted(res.out.splitlines()) == [
        f"[{RC}-decode-l4-worker-{i:05d}] decode {i} up" for i in range(4)]
    res = baton(capsys, monkeypatch, "logs", "-r", "prod", "-c", "decode")
    assert res.code == 2
    assert "no component or pool 'decode': give one of router, head, redis, prefill-h100, " \
           "decode-l4" in res.said


@pytest.mark.parametrize("args, says", [
    (["--kubeconfig", "/nope/kubeconfig"], "KubeConfigError: no kubeconfig at /nope/kubeconfig"),
    (["--context", "staging"], "KubeConfigError: no context 'staging' in kubeconfig"),
    (["-r", "dev"], "ReleaseNotFoundError: no RayCluster 'dev-baton' in namespace 'ml': is "
                    "Helm release 'dev' installed there?"),
    (["-r", "prod", "-n", "other"], "no RayCluster 'prod-baton' in namespace 'other'"),
])
def test_status_errors_say_what_to_change(kube, capsys, monkeypatch, args, says):
    res = baton(capsys, monkeypatch, "status", *args)
    assert res.code == 2
    assert says in res.said


def test_forbidden_and_unreachable_api_are_typed_errors(kube, tmp_path, capsys, monkeypatch):
    kube.denied.add(("patch", "rayclusters"))
    res = baton(capsys, monkeypatch, "scale", "decode-l4", "5", "-r", "prod", "--token", "t",
                "--router", "127.0.0.1:1")
    assert res.code == 2
    assert ("KubeAccessError: patching RayCluster prod-baton: forbidden (403): "
            "rayclusters.ray.io \"prod-baton\" is forbidden: User \"operator\" cannot patch "
            "resource \"rayclusters\"") in res.said
    assert group(kube, "decode-l4")["replicas"] == 4
    kube.denied.add(("get", "secrets"))
    res = baton(capsys, monkeypatch, "status", "-r", "prod", "-o", "json",
                "--router", "127.0.0.1:1")
    assert res.code == 0
    assert "secrets \"prod-baton-auth\" is forbidden" in json.loads(res.out)["router"]["error"]
    dead = write_kubeconfig(tmp_path / "dead", "http://127.0.0.1:1")
    res = baton(capsys, monkeypatch, "status", "-r", "prod", "--kubeconfig", str(dead))
    assert res.code == 2
    assert "KubeAPIError: reading RayCluster prod-baton: cannot reach the Kubernetes API at " \
           "http://127.0.0.1:1" in res.said


@pytest.mark.parametrize("release", ["baton", "team-baton-prod", "prod", "a" * 39])
def test_release_names_map_to_the_charts_resource_names(release):
    out = helm("template", release, str(CHART))
    assert out.returncode == 0, out.stderr
    rc = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "RayCluster")
    assert release_fullname(release) == rc["metadata"]["name"]
