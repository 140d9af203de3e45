"""Starting, finding and stopping a cluster's controller from outside it (`baton up`/`down`,
`serve_router`, tests).

The controller is a detached, named actor that Ray restarts when it dies (`max_restarts=-1`):
its workers outlive it and the new one adopts them (see cluster/controller.py). Calls in flight
when it dies are not retried (`max_task_retries=0`): a router's worker poll fails and it keeps
its last list, and `baton status` says the controller is restarting rather than waiting.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from baton.cluster.adoption import kill_named_workers
from baton.cluster.config import ClusterConfig
from baton.cluster.controller import CONTROLLER_NAME, NAMESPACE, Controller, kill_actor
from baton.errors import ClusterNotRunningError, ConfigError

log = logging.getLogger(__name__)


def start_controller(config: ClusterConfig, redis_url: str | None,
                     name: str = CONTROLLER_NAME, namespace: str = NAMESPACE,
                     **options: Any) -> Any:
    """Start the cluster's controller (detached, named) and its pools; returns its handle once
    every worker has loaded its model. `options` go to `Controller` (tick_s, drain_timeout_s,
    ...). A controller of that name already running: ConfigError."""
    try:
        handle: Any = ray.remote(Controller).options(
            name=name, namespace=namespace, lifetime="detached", num_cpus=0,
            get_if_exists=False, max_restarts=-1, max_task_retries=0,
        ).remote(config, redis_url, **options)
    except ValueError as exc:
        raise ConfigError(
            f"a Baton controller named {name!r} already runs in namespace {namespace!r}; stop "
            f"it first (`baton down`) or start this one under another name") from exc
    try:
        ray.get(handle.start.remote())
    except BaseException:
        stop_controller(handle)
        raise
    return handle


def get_controller(name: str = CONTROLLER_NAME, namespace: str = NAMESPACE) -> Any:
    """The running controller's handle; ClusterNotRunningError when there is none."""
    if not ray.is_initialized():
        raise ClusterNotRunningError(
            "not connected to Ray: start a cluster with `baton up`, or connect to the Ray cluster "
            "that runs one (ray.init(address=...) / --address)")
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError as exc:
        raise ClusterNotRunningError(
            f"no Baton controller named {name!r} in Ray namespace {namespace!r}: start the "
            f"cluster with `baton up` (or pass the --address of the Ray cluster running it)"
        ) from exc


def stop_controller(handle: Any, timeout_s: float = 30.0, *, cluster: str | None = None,
                    namespace: str = NAMESPACE) -> None:
    """Stop every worker of the controller, then the controller itself (both are detached, so
    they would otherwise outlive their driver). With `cluster` (the config's name), workers a
    dead or stuck controller could not stop are killed by name too."""
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    except Exception as exc:  # dead or stuck: its workers are killed by name below
        log.warning("controller shutdown: %r", exc)
    kill_actor(handle)
    if cluster is not None:
        kill_named_workers(cluster, namespace)
