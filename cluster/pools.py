"""Pools of worker actors placed by Ray resources: accelerator type and GPUs, or CPU cores."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import ray

from baton.actors.worker import Worker, WorkerSpec
from baton.cluster.config import ClusterConfig, PoolConfig

log = logging.getLogger(__name__)

# Asking for a sliver of the resource places the actor on a node advertising that type without
# using up the node's count of it.
ACCELERATOR_SHARE = 0.001


@dataclass(slots=True)
class Pools:
    """The live workers of a cluster, by pool name, and the token their KV link shares."""

    config: ClusterConfig
    kv_token: str
    workers: dict[str, list[Any]] = field(default_factory=dict)

    def by_role(self, *roles: str) -> list[Any]:
        return [w for pool in self.config.pools if pool.role in roles
                for w in self.workers.get(pool.name, [])]


# Ray lowers its worker processes' CPU priority (niceness 15) by default. Serving workers are the
# cluster's main work, and the router is on every request's path: at niceness 15 beside busy
# workers it got a few percent of a core, and new requests waited in it for up to a second.
SERVING_RUNTIME_ENV: dict[str, Any] = {"env_vars": {"RAY_worker_niceness": "0"}}


def actor_options(pool: PoolConfig) -> dict[str, Any]:
    """Ray actor options that place one replica of `pool` where it belongs."""
    options: dict[str, Any] = {
        "num_cpus": pool.num_cpus, "max_restarts": 0,
        "runtime_env": SERVING_RUNTIME_ENV,
    }
    if pool.num_gpus:
        options["num_gpus"] = pool.num_gpus
    if pool.accelerator_type:
        options["resources"] = {f"accelerator_type:{pool.accelerator_type}": ACCELERATOR_SHARE}
    return options


def worker_spec(config: ClusterConfig, pool: PoolConfig, kv_token: str,
                replica: int = 0) -> WorkerSpec:
    """One replica's spec: the pool's engine options, with its dtype and device, and on a CPU
    pool as many threads as it has cores unless the options say otherwise."""
    threads = pool.engine.num_threads
    if threads is None and pool.device == "cpu":
        threads = max(int(pool.num_cpus), 1)
    engine = pool.engine.model_copy(
        update={"dtype": pool.dtype, "device": pool.device, "num_threads": threads})
    cores = None
    if pool.cpu_cores:
        n = int(pool.num_cpus)
        cores = pool.cpu_cores[replica * n : (replica + 1) * n]
    return WorkerSpec(role=pool.role, model=pool.model or config.model, engine=engine,
                      kv_token=kv_token, kv_timeout_s=config.kv_timeout_s,
                      prefill_threshold=config.prefill_threshold, cpu_affinity=cores)


def start_pools(config: ClusterConfig, kv_token: str | None = None) -> Pools:
    """Create every pool's replicas and wait until each has loaded its model."""
    pools = Pools(config, kv_token or secrets.token_urlsafe(24))
    remote = ray.remote(Worker)
    for pool in config.pools:
        options = actor_options(pool)
        pools.workers[pool.name] = [
            remote.options(**options).remote(worker_spec(config, pool, pools.kv_token, i))
            for i in range(pool.replicas)
        ]
    ray.get([w.info.remote() for ws in pools.workers.values() for w in ws])
    log.info("pools up: %s", {k: len(v) for k, v in pools.workers.items()})
    return pools
