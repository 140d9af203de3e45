"""`python -m baton.ops.serve_router`: the router as a process of its own, on a running Ray cluster.

On Kubernetes this is the Helm chart's router Deployment: its pod joins the RayCluster as a node
without CPUs for actors (`ray start --address=<head>:6379 --num-cpus=0`), then runs this. Ray
Client cannot carry the workers' streaming calls, so the router must be a driver on a Ray node.

It joins Ray, uses the cluster's controller or starts one from a task on the head node (pools from
`--config`; Ray places the zero-CPU controller on the node that asks first, so a router pod's
restart should not take the controller along), waits until a decode worker is up, then serves gRPC
(and HTTP) until SIGTERM. The API token and the Redis URL come from the environment
(`BATON_API_TOKEN`, `BATON_REDIS_URL`), so they stay off the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from baton.cluster.config import ClusterConfig, load_config
from baton.cluster.controller import CONTROLLER_NAME, NAMESPACE
from baton.cluster.lifecycle import get_controller, start_controller
from baton.errors import ClusterNotRunningError, ConfigError, WorkerUnavailableError
from baton.router.app import RouterActor, RouterSettings, split_roles
from baton.router.selection import SelectionSettings

log = logging.getLogger(__name__)

HEAD_RESOURCE = "node:__internal_head__"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Baton's router on a running Ray cluster")
    parser.add_argument("--config", required=True, help="the cluster YAML (baton up -c)")
    parser.add_argument("--address", default="auto", help="Ray address (auto: this node's)")
    parser.add_argument("--namespace", default=NAMESPACE, help="Ray namespace of the cluster")
    parser.add_argument("--host", default="0.0.0.0", help="address the API binds to")
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--http-port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--no-http", action="store_true", help="no OpenAI-style HTTP API")
    parser.add_argument("--startup-timeout", type=float, default=1800.0,
                        help="seconds to wait for a decode worker")
    return parser.parse_args(argv)


def router_settings(args: argparse.Namespace, config: ClusterConfig,
                    env: Mapping[str, str]) -> RouterSettings:
    """The router's settings: ports from the command line, secrets from the environment."""
    return RouterSettings(
        model=config.model, host=args.host, grpc_port=args.grpc_port,
        http_port=None if args.no_http else args.http_port,
        token=env.get("BATON_API_TOKEN") or None,
        redis_url=env.get("BATON_REDIS_URL") or config.redis.url, cluster=config.name,
        controller=CONTROLLER_NAME, namespace=args.namespace,
        selection=SelectionSettings(**config.selector.model_dump()))


def ensure_controller(config: ClusterConfig, redis_url: str | None, namespace: str) -> None:
    """Start the cluster's controller and pools from a task on the head node, unless one already
    runs (another router started it: then this one just uses it)."""
    try:
        get_controller(namespace=namespace)
        return
    except ClusterNotRunningError:
        pass
    heads = [n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"]]
    if not heads:
        raise ClusterNotRunningError("no live Ray head node to start the controller on")
    log.info("starting the controller and its pools from the head node")
    task = ray.remote(start_controller).options(
        num_cpus=0, max_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(heads[0], soft=False))
    try:
        ray.get(task.remote(config, redis_url, namespace=namespace))
    except ray.exceptions.RayTaskError as exc:
        if not isinstance(exc.cause, ConfigError):
            raise
        get_controller(namespace=namespace)  # started by another router meanwhile
        log.info("controller started by another router: %s", exc.cause)


def wait_for_decode(namespace: str, timeout_s: float, poll_s: float = 2.0) -> None:
    """Block until the controller lists a live decode worker (its pools may still be loading)."""
    controller = get_controller(namespace=namespace)
    deadline = time.monotonic() + timeout_s
    while not split_roles(ray.get(controller.workers.remote()))[0]:
        if time.monotonic() > deadline:
            raise WorkerUnavailableError(
                f"no decode worker after {timeout_s:g} s: see the controller's log on the head")
        time.sleep(poll_s)


async def serve(settings: RouterSettings) -> None:
    """Run the router until SIGTERM or SIGINT, then stop its servers cleanly."""
    router = RouterActor(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ports = await router.start()
    log.info("router serving: %s", ports)
    await stop.wait()
    log.info("router stopping")
    await router.stop()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = load_config(args.config)
    settings = router_settings(args, config, os.environ)
    log.info("joining Ray at %s", args.address)
    ray.init(address=args.address, namespace=args.namespace, logging_level=logging.ERROR,
             log_to_driver=False)
    try:
        ensure_controller(config, settings.redis_url, args.namespace)
        wait_for_decode(args.namespace, args.startup_timeout)
        asyncio.run(serve(settings))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
