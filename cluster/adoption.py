"""Worker actors a restarted controller finds again, and the ones `baton down` must still kill.

Workers are detached and named `baton-worker/<cluster>/<worker id>` in the controller's Ray
namespace, so they outlive a controller that crashed. Ray restarts the controller
(`max_restarts=-1`) and the new one adopts every live worker of its cluster through this module:
same ids, same pinned cores, same KV-link token (read back from the workers themselves, so the
secret is stored nowhere else). Detached workers end only when killed: stopping a cluster kills
them by name here as well, in case its controller is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray

from baton.actors.worker import WorkerSpec
from baton.cluster.replicas import PoolReplicas, Replica

log = logging.getLogger(__name__)

WORKER_PREFIX = "baton-worker"


def worker_name(cluster: str, worker_id: str) -> str:
    """The Ray actor name of one worker of `cluster`."""
    return f"{WORKER_PREFIX}/{cluster}/{worker_id}"


def named_workers(cluster: str, namespace: str) -> dict[str, Any]:
    """Live workers of `cluster` in `namespace` by worker id (blocking Ray calls: run it off
    an event loop)."""
    prefix = worker_name(cluster, "")
    found: dict[str, Any] = {}
    for row in ray.util.list_named_actors(all_namespaces=True):
        if row["namespace"] != namespace or not row["name"].startswith(prefix):
            continue
        try:
            found[row["name"][len(prefix):]] = ray.get_actor(row["name"], namespace=namespace)
        except ValueError:  # gone since listed
            continue
    return found


def kill_named_workers(cluster: str, namespace: str, timeout_s: float = 30.0) -> int:
    """Kill every worker of `cluster` and wait until their names are free; how many were
    killed. Blocking: run it off an event loop."""
    found = named_workers(cluster, namespace)
    for worker_id, handle in found.items():
        log.info("killing worker %s of cluster %s", worker_id, cluster)
        try:
            ray.kill(handle, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already gone
            log.debug("kill %s: %r", worker_id, exc)
    deadline = time.monotonic() + timeout_s
    while found and named_workers(cluster, namespace) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(found)


@dataclass(slots=True)
class LiveWorker:
    """A worker found alive after a controller restart: its launch spec and current info."""

    worker_id: str
    handle: Any
    spec: WorkerSpec
    info: dict[str, Any]


async def find_live_workers(cluster: str, namespace: str, timeout_s: float) -> list[LiveWorker]:
    """Every worker of `cluster` that answers within `timeout_s`; those that do not are killed
    (a replacement is cheaper than a worker nobody can reach)."""
    found = await asyncio.to_thread(named_workers, cluster, namespace)
    ids = sorted(found)
    answers = await asyncio.gather(
        *(asyncio.wait_for(found[i].describe.remote(), timeout_s) for i in ids),
        return_exceptions=True)
    live = []
    for worker_id, answer in zip(ids, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("worker %s did not answer the restarted controller (%r); killing it",
                        worker_id, answer)
            ray.kill(found[worker_id], no_restart=True)
            continue
        spec, info = answer
        live.append(LiveWorker(worker_id, found[worker_id], spec, info))
    return live


def adopt_workers(pools: dict[str, PoolReplicas], live: list[LiveWorker],
                  targets: dict[str, int] | None,
                  registered: set[str]) -> tuple[list[Replica], list[LiveWorker]]:
    """Give each pool its live workers back (same ids and cores), keep the ids of `registered`
    workers from being given out again, and set each pool's target: as recorded (`targets`),
    else the config's, or as many as were adopted if more. Returns (the adopted replicas, the live
    workers that belong to no pool of this config)."""
    for worker_id in registered:
        if (p := pools.get(_pool_of(worker_id))) is not None:
            p.reserve_id(worker_id)
    adopted, strays = [], []
    for w in live:
        p = pools.get(_pool_of(w.worker_id))
        if p is None or w.spec.role != p.pool.role:
            strays.append(w)
            continue
        adopted.append(p.adopt(w.worker_id, w.handle, w.spec.cpu_affinity, w.info))
    for name, p in pools.items():
        count = sum(1 for r in adopted if r.pool == name)
        p.target = (targets or {}).get(name, max(count, p.target))
    return adopted, strays


def _pool_of(worker_id: str) -> str:
    return worker_id.rsplit("-", 1)[0]  # ids are `<pool>-<n>`
