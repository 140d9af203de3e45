"""Ray's job server (the dashboard's Jobs API) as `baton submit` and `baton jobs` use it.

Where the server is: `--address`, else `RAY_API_SERVER_ADDRESS` (Ray's own variable, which Ray's
client also obeys over any address given), else the job server of the local cluster `baton up`
started, else `http://127.0.0.1:8265`. Ray's token auth: the
token goes in an `Authorization: Bearer` header (what Ray's client sends itself when its process
runs with `RAY_AUTH_MODE=token`); it is `--token`, else `RAY_AUTH_TOKEN`, else, for a job server
on this machine, the Ray token of the local cluster `baton up` recorded. Ray's failures become
`baton.errors` types that say what to do.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from baton.cluster.local_record import LocalCluster
from baton.errors import (
    AuthError,
    ClusterNotRunningError,
    ConfigError,
    JobNotFoundError,
    JobServerError,
)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
TOKEN_ENV = "RAY_AUTH_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)

T = TypeVar("T")

log = logging.getLogger(__name__)

# How long a call waits for a head whose job agent is not up yet (Ray: "try again later").
AGENT_WAIT_S = 30.0


def job_address(address: str | None) -> str:
    """The job server to talk to: given, from the environment, `baton up`'s, or the default."""
    if address or os.environ.get(ADDRESS_ENV):
        return address or os.environ[ADDRESS_ENV]
    try:
        return LocalCluster.load().job_address or DEFAULT_ADDRESS
    except ClusterNotRunningError:
        return DEFAULT_ADDRESS


def is_local(address: str) -> bool:
    return urlparse(address if "://" in address else f"http://{address}").hostname in LOOPBACK


def local_router(address: str, token: str | None) -> tuple[str | None, str | None]:
    """For a job on the job server of the local cluster `baton up` started: its router's
    address and API token (the job reaches the router it would find anyway, with the token it
    needs); (None, token) for any other job server."""
    try:
        cluster = LocalCluster.load()
    except ClusterNotRunningError:
        return None, token
    if cluster.job_address is None or address.rstrip("/") != cluster.job_address:
        return None, token
    return cluster.grpc_address, token or cluster.token


def job_token(address: str, token: str | None) -> str | None:
    """The Ray token to send: given, from the environment, or (loopback only) `baton up`'s."""
    if token or os.environ.get(TOKEN_ENV):
        return token or os.environ.get(TOKEN_ENV)
    if not is_local(address):
        return None  # never send this machine's token elsewhere
    try:
        return LocalCluster.load().ray_token
    except ClusterNotRunningError:
        return None


class JobServer:
    """One job server, its calls checked: each raises a `baton.errors` type on failure."""

    def __init__(self, address: str | None = None, token: str | None = None):
        self.address = job_address(address)
        token = job_token(self.address, token)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            self.client = JobSubmissionClient(self.address, headers=headers)
        except ConnectionError:
            raise JobServerError(
                f"no Ray job server answers at {self.address}. Start one: `ray start --head "
                "--dashboard-host 127.0.0.1` on this machine (its jobs API is on port 8265), or "
                "pass --address http://HEAD:8265 (on Kubernetes: `kubectl port-forward "
                "svc/<release>-head-svc 8265`)") from None
        except AuthenticationError:
            raise self._auth_error() from None

    def _auth_error(self) -> AuthError:
        return AuthError(f"the job server at {self.address} refused the Ray token; pass --token "
                         f"or set {TOKEN_ENV} to the cluster's Ray auth token")

    def call(self, fn: Callable[..., T], *args: Any, job_id: str | None = None,
             **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the Ray client, its errors said Baton's way. While the head's
        job agent is still starting (Ray answers 500, "please try again later": right after a
        cluster comes up, or on a loaded head), the call is tried again for up to
        `AGENT_WAIT_S`."""
        deadline = time.monotonic() + AGENT_WAIT_S
        delay = 0.25
        while True:
            try:
                return fn(*args, **kwargs)
            except AuthenticationError:
                raise self._auth_error() from None
            except ConnectionError:
                raise JobServerError(f"the job server at {self.address} stopped answering; "
                                     "check that the Ray head is up") from None
            except RuntimeError as exc:
                if job_id is not None and ("404" in str(exc) or "does not exist" in str(exc)):
                    raise JobNotFoundError(f"no job {job_id!r} at {self.address}; see `baton "
                                           "jobs list` for the jobs there") from None
                if "try again later" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
                log.info("the job server at %s is not ready (%s); trying again", self.address,
                         exc)
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def status(self, job_id: str) -> JobStatus:
        return self.call(self.client.get_job_status, job_id, job_id=job_id)


def batch_entrypoint(input_path: str, output_path: str, options: list[str],
                     python: str = "python") -> str:
    """The shell command a Ray job runs: `python -m baton.ops.batch INPUT --output OUT ...`."""
    return shlex.join([python, "-m", "baton.ops.batch", input_path, "--output", output_path,
                       *options])


def job_paths(address: str, input_path: str, output_path: str) -> tuple[str, str, str]:
    """Input, output and python as the job will see them.

    A job server on this machine runs the job here: paths are made absolute (the job does not
    start in this directory), the input must exist, and the job runs this Python. Elsewhere the
    paths are the head node's, taken as given, and `python` is the one on the head's PATH.
    """
    if not is_local(address):
        return input_path, output_path, "python"
    src = Path(input_path).expanduser().resolve()
    if not src.is_file():
        raise ConfigError(f"batch input {src} does not exist; give the path of a JSONL file "
                          "with one request per line")
    return str(src), str(Path(output_path).expanduser().resolve()), sys.executable
