"""`python -m baton.ops.serve_router`, the command the chart's router pods run, on real Ray and a
real redis-server: it starts the controller and pools from the config file on the head node,
serves with the token from its environment, and returns cleanly on SIGTERM.

`main` runs in this process (a subprocess would import torch once more: half a minute on a busy
2-core machine); `--address local` gives it a Ray instance of its own, which it shuts down.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.client import BatonClient
from baton.errors import AuthError
from baton.ops import serve_router
from baton.ports import free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

TOKEN = "router-test-token"


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _use_router(address: str, finished: threading.Event, seen: dict[str, Any]) -> None:
    """While `main` serves: one completion with the token, one refused without; then SIGTERM."""
    try:
        wait_until(lambda: finished.is_set() or _serving(address), timeout_s=150,
                   what="the router to report SERVING")
        if finished.is_set():
            return
        seen["serving"] = True
        with BatonClient(address, token=TOKEN) as client:
            seen["tokens"] = client.complete("Hello there", max_tokens=4, timeout_s=60).token_ids
        with BatonClient(address) as client:
            try:
                client.complete("Hello there", max_tokens=4, timeout_s=60)
            except AuthError as exc:
                seen["refused"] = exc
    except BaseException as exc:  # reported by the test, in the main thread
        seen["error"] = exc
    finally:
        if not finished.is_set():
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory, monkeypatch_module) -> dict[str, Any]:
    config = tmp_path_factory.mktemp("serve_router") / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "name": "serve-router", "model": "tiny:llama",
        # One pool keeps the test short: what is under test is the process, not P/D.
        "pools": [{"name": "decode", "role": "both", "dtype": "float32",
                   "engine": {"block_size": 8, "num_threads": 1}}],
    }))
    monkeypatch_module.setenv("BATON_API_TOKEN", TOKEN)
    monkeypatch_module.setenv("BATON_REDIS_URL", redis_url)
    address = f"127.0.0.1:{free_port()}"
    finished = threading.Event()
    seen: dict[str, Any] = {}
    user = threading.Thread(target=_use_router, args=(address, finished, seen), daemon=True)
    user.start()
    try:
        serve_router.main(["--config", str(config), "--address", "local", "--host", "127.0.0.1",
                           "--grpc-port", address.rsplit(":", 1)[1], "--no-http",
                           "--startup-timeout", "120"])
        seen["returned"] = True
    finally:
        finished.set()
        user.join(timeout=30)
    if "error" in seen:
        raise seen["error"]
    return seen


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
def test_router_serves_a_completion_with_the_token_from_its_environment(served):
    assert served.get("serving"), "the router never reported SERVING"
    assert len(served["tokens"]) == 4
    assert isinstance(served.get("refused"), AuthError), "a call without the token was served"


@pytest.mark.slow
def test_router_returns_cleanly_on_sigterm(served):
    assert served.get("returned")
