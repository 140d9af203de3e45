"""The process `baton up` leaves behind on one machine: it owns the local Ray and `redis-server`.

Started as `python -m baton.cluster.local_daemon` in a session of its own (so both outlive the
CLI, and a Ctrl-C at the terminal reaches neither). It writes where they listen to the `--ready`
file (or `{"error": ...}`), then waits for SIGTERM (`baton down`) and shuts both down cleanly.
Ray reads its token-auth settings when it is imported, so this module imports Ray only once
`main` has set them.

Ray listens on loopback only: its GCS, raylet, workers and agents bind to the node's IP, and
Ray takes the loopback address as the node's IP only when it believes it runs on a laptop
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, Ray's own switch for macOS and Windows); an explicit
`_node_ip_address="127.0.0.1"` is replaced by the machine's routable address. Every process Ray
starts inherits the setting from this one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from baton.cluster.redis_server import RedisServer
from baton.ports import free_port

# Ray's switch for laptops (macOS, Windows): "0" makes the node's IP the loopback address.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def serve(ready: Path, namespace: str, num_cpus: int, redis_dir: str, with_ray: bool) -> None:
    """Own Ray and Redis until SIGTERM, then shut both down cleanly."""
    import ray  # after `main` set the auth settings Ray reads at import

    from baton.cluster.ray_start import init_local

    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    redis = RedisServer(redis_dir) if redis_dir else None
    try:
        info: dict[str, Any] = {}
        if redis is not None:
            info["redis_url"] = redis.start()
            info["redis_data_dir"] = redis_dir
        if with_ray:
            info["ray_token"] = os.environ["RAY_AUTH_TOKEN"]
            # Loopback only (see the module doc): nothing outside this machine joins.
            # The dashboard serves Ray's job API (`baton submit`, `ray job submit`).
            context = init_local(num_cpus=num_cpus, include_dashboard=True,
                                 dashboard_host="127.0.0.1", dashboard_port=free_port(),
                                 namespace=namespace, logging_level=logging.ERROR)
            info["ray_address"] = ray.get_runtime_context().gcs_address
            if context.dashboard_url:
                info["job_address"] = f"http://{context.dashboard_url}"
    except Exception as exc:  # noqa: BLE001 - reported to `baton up`, which says it
        ready.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        if redis is not None:
            redis.stop()
        return
    # After ray.init, which installs handlers of its own.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ready.write_text(json.dumps(info))
    while not stop:
        time.sleep(0.5)
    if with_ray:
        ray.shutdown()
    if redis is not None:
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Baton's local Ray + Redis daemon")
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--redis-dir", default="")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    # Ray's token auth with a token Baton knows, so `baton` commands can join.
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ[RAY_LOOPBACK_ENV] = "0"  # Ray on loopback: see the module doc
    serve(args.ready, args.namespace, args.num_cpus, args.redis_dir, not args.no_ray)


if __name__ == "__main__":
    main()
