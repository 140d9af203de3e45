"""What `baton up` recorded about the local cluster it started: read by `baton status`, `drain`,
`scale`, `submit` and the router commands without importing Ray, the router or the engine."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from baton.actors.model_source import cache_root
from baton.cluster.local_daemon import RAY_LOOPBACK_ENV
from baton.errors import ClusterNotRunningError

NAMESPACE = "baton"


def run_dir() -> Path:
    return cache_root() / "run"


def state_file() -> Path:
    return run_dir() / "cluster.json"


@dataclass(slots=True)
class LocalCluster:
    """What `baton up` started and where it listens."""

    ray_address: str
    ray_token: str | None  # Ray's own auth token for the local instance (None: joined one)
    redis_url: str | None
    grpc_address: str
    http_address: str | None
    token: str | None
    daemon_pid: int | None  # None: Ray and Redis were not started by Baton
    redis_data_dir: str | None
    name: str = "default"  # the cluster config's name: its Redis keys' namespace
    job_address: str | None = None  # Ray's job server (dashboard) of the Ray `up` started

    def save(self) -> None:
        run_dir().mkdir(parents=True, exist_ok=True)
        path = state_file()
        path.write_text(json.dumps(asdict(self), indent=2))
        path.chmod(0o600)  # holds the Redis password and the API token

    def connect(self) -> None:
        """Join this cluster's Ray as a driver."""
        import ray
        from ray._private import ray_constants

        if self.ray_token:
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = self.ray_token
            from ray._raylet import Config  # type: ignore[attr-defined]

            Config.initialize("")  # Ray read its settings at import: make it read them again
        if self.ray_address.startswith("127.0.0.1:"):
            # Ray would swap 127.0.0.1 for this machine's routable address, where a Ray that
            # `baton up` keeps on loopback does not listen (see cluster/local_daemon.py).
            os.environ[RAY_LOOPBACK_ENV] = "0"
            ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(address=self.ray_address, namespace=NAMESPACE, logging_level=logging.ERROR,
                 log_to_driver=False)

    @classmethod
    def load(cls) -> LocalCluster:
        try:
            return cls(**json.loads(state_file().read_text()))
        except FileNotFoundError:
            raise ClusterNotRunningError(
                "no local Baton cluster is running (nothing recorded by `baton up`); start one "
                "with `baton up`") from None
