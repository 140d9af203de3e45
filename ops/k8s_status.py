"""`baton k8s status`: the Kubernetes side (RayCluster, pools, pods) joined with the router's view
(workers, load), as one report for people (tables) or programs (JSON)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from baton.cluster.k8s import COMPONENT_LABEL, POOL_LABEL, ROLE_LABEL, KubeRelease
from baton.ops.cluster_cmds import _status_rows, expert_cell, worker_columns


def pod_row(pod: Any) -> dict[str, Any]:
    labels = pod.metadata.labels or {}
    statuses = pod.status.container_statuses or []
    conditions = {c.type: c.status for c in pod.status.conditions or []}
    return {"name": pod.metadata.name, "component": labels.get(COMPONENT_LABEL, ""),
            "pool": labels.get(POOL_LABEL), "phase": pod.status.phase or "Unknown",
            "ready": conditions.get("Ready") == "True",
            "restarts": sum(int(s.restart_count or 0) for s in statuses),
            "node": pod.spec.node_name}


def pool_rows(raycluster: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per worker group (pool): what the RayCluster asks for and what pods are ready."""
    rows = []
    for g in raycluster["spec"].get("workerGroupSpecs") or []:
        name = g["groupName"]
        labels = (g.get("template") or {}).get("metadata", {}).get("labels") or {}
        mine = [p for p in pods if p["pool"] == name]
        rows.append({"pool": name, "role": labels.get(ROLE_LABEL, ""),
                     "replicas": int(g.get("replicas", 0)),
                     "min_replicas": int(g.get("minReplicas", 0)),
                     "max_replicas": int(g.get("maxReplicas", 0)),
                     "pods": len(mine), "ready_pods": sum(p["ready"] for p in mine)})
    return rows


def kube_report(rel: KubeRelease) -> dict[str, Any]:
    """The Kubernetes part of the status: RayCluster state, pools, pods."""
    rc = rel.raycluster()
    pods = [pod_row(p) for p in rel.pods()]
    st = rc.get("status") or {}
    return {
        "release": rel.release, "namespace": rel.namespace,
        "raycluster": {"name": rc["metadata"]["name"], "state": st.get("state", "unknown"),
                       "reason": st.get("reason"),
                       "ready_workers": int(st.get("readyWorkerReplicas", 0)),
                       "desired_workers": int(st.get("desiredWorkerReplicas", 0))},
        "pools": pool_rows(rc, pods),
        "pods": pods,
    }


def router_report(address: str, resp: Any) -> dict[str, Any]:
    return {"address": address, "reachable": True, "error": None,
            "workers": _status_rows(resp), "queue_depth": resp.queue_depth,
            "in_flight": resp.in_flight, "ttft_p50_s": resp.ttft_p50_s,
            "ttft_p99_s": resp.ttft_p99_s, "tpot_p50_s": resp.tpot_p50_s,
            "tpot_p99_s": resp.tpot_p99_s, "redis": resp.state_available}


def router_unreachable(address: str | None, why: str) -> dict[str, Any]:
    return {"address": address, "reachable": False, "error": why, "workers": []}


def print_report(report: dict[str, Any], console: Console) -> None:
    rc = report["raycluster"]
    console.print(f"[bold]RayCluster {rc['name']}[/] (release {report['release']}, namespace "
                  f"{report['namespace']}): {rc['state']}"
                  + (f" ({rc['reason']})" if rc["reason"] else "")
                  + f", {rc['ready_workers']}/{rc['desired_workers']} Ray workers ready")
    pools = Table(title="Pools (RayCluster worker groups)")
    for col in ("pool", "role", "replicas", "min-max", "pods ready"):
        pools.add_column(col)
    for p in report["pools"]:
        pools.add_row(p["pool"], p["role"], str(p["replicas"]),
                      f"{p['min_replicas']}-{p['max_replicas']}",
                      f"{p['ready_pods']}/{p['pods']}")
    console.print(pools)
    pods = Table(title="Pods")
    for col in ("pod", "component", "pool", "phase", "ready", "restarts", "node"):
        pods.add_column(col)
    for p in report["pods"]:
        pods.add_row(p["name"], p["component"], p["pool"] or "", p["phase"],
                     "yes" if p["ready"] else "[yellow]no[/]", str(p["restarts"]),
                     p["node"] or "")
    console.print(pods)
    r = report["router"]
    if not r["reachable"]:
        console.print("[yellow]router not reached[/]"
                      + (f" at {r['address']}" if r["address"] else "") + f": {r['error']}")
        return
    workers = Table(title=f"Baton workers (router {r['address']})")
    columns = worker_columns(r["workers"], ("worker", "pool", "role", "state", "running",
                                            "waiting", "KV used"))
    for col in columns:
        workers.add_column(col)
    for w in r["workers"]:
        cells = [w["worker_id"], w["pool"], w["role"],
                 w["state"] if w["alive"] else "[red]dead[/]", str(w["running"]),
                 str(w["waiting"]), f"{w['kv_usage']:.1%}", expert_cell(w)]
        workers.add_row(*cells[:len(columns)])
    console.print(workers)
    console.print(f"queue {r['queue_depth']}, in flight {r['in_flight']}; TTFT p50/p99 "
                  f"{r['ttft_p50_s'] * 1000:.0f}/{r['ttft_p99_s'] * 1000:.0f} ms; Redis "
                  + ("reachable" if r["redis"] else "[yellow]unreachable[/]"))
