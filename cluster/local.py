"""`baton up` / `baton down` on one machine: Ray, Redis, the controller and the router.

`up` starts a small daemon (`baton.cluster.local_daemon`) that owns the local Ray instance and
the `redis-server` (so both outlive the CLI, and a Ctrl-C at the terminal reaches neither), waits
for it to write where they listen, then starts the controller (pools from the config) and the
router as detached, named actors. `down` stops the router and the controller, then the daemon,
which shuts Ray and Redis down cleanly. What `up` started is recorded in `run/cluster.json` under
Baton's cache, which `status` and `down` read.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

import ray

from baton.cluster.config import ClusterConfig, load_config
from baton.cluster.local_record import NAMESPACE, LocalCluster, run_dir, state_file
from baton.cluster.pools import SERVING_RUNTIME_ENV
from baton.errors import ClusterNotRunningError, ConfigError
from baton.router.app import RouterActor, RouterSettings
from baton.router.selection import SelectionSettings

log = logging.getLogger(__name__)

ROUTER_NAME = "baton-router"
DAEMON_START_TIMEOUT_S = 90.0


def default_local_config() -> ClusterConfig:
    """One prefill and one decode worker on the default model, each pinned to its own core."""
    cores = sorted(os.sched_getaffinity(0))
    config = ClusterConfig()
    if len(cores) >= 2:
        for pool, core in zip(config.pools, cores, strict=False):
            pool.cpu_cores = [core]
    return config


def up(config_path: str | None = None, *, address: str | None = None,
       redis_url: str | None = None, host: str = "127.0.0.1", grpc_port: int = 50051,
       http_port: int | None = 8000, token: str | None = None) -> LocalCluster:
    """Bring the cluster up; returns where it listens (also saved for `status` and `down`)."""

    if state_file().exists():
        raise ConfigError(f"a Baton cluster is already up (see {state_file()}); run `baton down`"
                          " first")
    config = load_config(config_path) if config_path else default_local_config()
    redis_url = redis_url or config.redis.url
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        token = secrets.token_urlsafe(24)  # never an open API beyond loopback
    daemon = None
    if address is None or redis_url is None:
        daemon = _start_daemon(config, with_ray=address is None, with_redis=redis_url is None)
        address = address or daemon["ray_address"]
        redis_url = redis_url or daemon["redis_url"]
    cluster = LocalCluster(
        ray_address=address, ray_token=daemon.get("ray_token") if daemon else None,
        redis_url=redis_url, grpc_address=f"{host}:{grpc_port}",
        http_address=f"{host}:{http_port}" if http_port is not None else None, token=token,
        daemon_pid=daemon["pid"] if daemon else None,
        redis_data_dir=daemon.get("redis_data_dir") if daemon else None, name=config.name,
        job_address=daemon.get("job_address") if daemon else None)
    cluster.save()
    try:
        cluster.connect()
        ports = _start_services(config, cluster, host, grpc_port, http_port)
    except BaseException:
        down()
        raise
    # Port 0 asks the router to bind any free port: record the ones it got.
    cluster.grpc_address = f"{host}:{ports['grpc']}"
    if "http" in ports:
        cluster.http_address = f"{host}:{ports['http']}"
    cluster.save()
    return cluster


def _start_services(config: ClusterConfig, cluster: LocalCluster, host: str, grpc_port: int,
                    http_port: int | None) -> dict[str, int]:
    """Start the controller and the router; the ports the router bound."""
    # The controller module brings in the worker actor, and with it torch: only `up` and `down`
    # import it, so `baton status` does not wait for torch.
    from baton.cluster.controller import CONTROLLER_NAME
    from baton.cluster.lifecycle import start_controller

    start_controller(config, cluster.redis_url, namespace=NAMESPACE)
    settings = RouterSettings(model=config.model, host=host, grpc_port=grpc_port,
                              http_port=http_port, token=cluster.token,
                              redis_url=cluster.redis_url, cluster=config.name,
                              controller=CONTROLLER_NAME, namespace=NAMESPACE,
                              selection=SelectionSettings(**config.selector.model_dump()))
    router = ray.remote(RouterActor).options(
        name=ROUTER_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
        max_restarts=0, runtime_env=SERVING_RUNTIME_ENV).remote(settings)
    return ray.get(router.start.remote())


def down() -> bool:
    """Stop what `up` started; False when nothing was running."""
    try:
        cluster = LocalCluster.load()
    except ClusterNotRunningError:
        return False
    try:
        if not ray.is_initialized():
            cluster.connect()
        _stop_services(cluster.name)
    except Exception as exc:  # noqa: BLE001 - Ray already gone: the daemon still needs stopping
        log.warning("could not reach the cluster's Ray (%s); stopping what is left", exc)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster.daemon_pid:
            _stop_daemon(cluster.daemon_pid)
        state_file().unlink(missing_ok=True)
    return True


def _stop_services(cluster: str) -> None:
    from baton.cluster.adoption import kill_named_workers  # torch: see above
    from baton.cluster.lifecycle import get_controller, stop_controller

    try:
        router = ray.get_actor(ROUTER_NAME, namespace=NAMESPACE)
        ray.get(router.stop.remote(), timeout=15)
        ray.kill(router, no_restart=True)
    except Exception as exc:  # noqa: BLE001 - not running is fine
        log.info("router: %r", exc)
    try:
        stop_controller(get_controller(namespace=NAMESPACE), cluster=cluster,
                        namespace=NAMESPACE)
    except ClusterNotRunningError:  # its workers are detached: they still need stopping
        kill_named_workers(cluster, NAMESPACE)


# -- the daemon -------------------------------------------------------------------------------


def _start_daemon(config: ClusterConfig, with_ray: bool, with_redis: bool) -> dict[str, Any]:
    run_dir().mkdir(parents=True, exist_ok=True)
    ready = run_dir() / "daemon.json"
    ready.unlink(missing_ok=True)
    cpus = max(int(sum(p.num_cpus * p.replicas for p in config.pools)), os.cpu_count() or 1)
    args = [sys.executable, "-m", "baton.cluster.local_daemon", "--ready", str(ready),
            "--namespace", NAMESPACE, "--num-cpus", str(cpus), "--redis-dir",
            str(config.redis.data_path(config.name)) if with_redis else ""]
    if not with_ray:
        args.append("--no-ray")
    with open(run_dir() / "daemon.log", "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready.exists():
            info = json.loads(ready.read_text())
            if "error" in info:
                raise ConfigError(f"baton up failed to start its services: {info['error']}")
            return {"pid": proc.pid, **info}
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise ConfigError(f"baton up: Ray/Redis did not come up; see {run_dir() / 'daemon.log'}")


def _stop_daemon(pid: int, timeout_s: float = 30.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
