"""`baton up` / `status` / `down` as an operator runs them (real subprocesses, real Ray, real
redis-server, real gRPC and HTTP), with a decode worker killed under load, the controller process
killed under load, and Redis stopped and restarted under load. The tiny model keeps it fast; the
cache (and so the run state) is a temp dir."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from baton.client import AdminClient, BatonClient
from baton.cluster.redis_server import RedisServer, stop_redis
from baton.cluster.state import ClusterState
from baton.errors import WorkerUnavailableError
from tests.conftest import wait_until

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

BIN = Path(sys.executable).parent
CONFIG = {
    "name": "uptest",
    "model": "tiny:llama",
    "prefill_threshold": 16,
    "pools": [
        # Half a core each, so a scaled-up pool still fits this 2-core machine's Ray.
        {"name": "prefill", "role": "prefill", "dtype": "float32", "num_cpus": 0.5,
         "engine": {"block_size": 8, "num_kv_blocks": 512}},
        {"name": "decode", "role": "decode", "dtype": "float32", "num_cpus": 0.5,
         "engine": {"block_size": 8, "num_kv_blocks": 512}},
    ],
}

# Run inside the cluster's Ray from a separate process (the test process keeps its own Ray state).
KILL_DECODE = """
from baton.cluster.local_record import LocalCluster
import ray
LocalCluster.load().connect()
rows = ray.get(ray.get_actor("baton-controller", namespace="baton").workers.remote())
(decode,) = [r for r in rows if r["role"] == "decode"]
ray.kill(decode["handle"], no_restart=True)
print(decode["worker_id"])
"""
KILL_CONTROLLER = """
import os, signal
from baton.cluster.local_record import LocalCluster
import ray
LocalCluster.load().connect()
controller = ray.get_actor("baton-controller", namespace="baton")
pid = ray.get(controller.__ray_call__.remote(lambda c: os.getpid()))
os.kill(pid, signal.SIGKILL)
print(pid)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("baton")
    CONFIG["redis"] = {"data_dir": str(home / "redis")}
    cfg = home / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "BATON_CACHE": str(home / "cache"), "PYTHONUNBUFFERED": "1"}

    def baton(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "baton"), *args], capture_output=True, text=True,
                              timeout=timeout, env=env)

    # Port 0: the router binds free ports itself (no race with Ray's own listeners) and `up`
    # records the ones it got.
    up = baton("up", "--config", str(cfg), "--grpc-port", "0", "--http-port", "0")
    assert up.returncode == 0, up.stdout + up.stderr
    run = json.loads((home / "cache" / "run" / "cluster.json").read_text())
    address = run["grpc_address"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    assert f"gRPC {address}" in up.stdout and f"http://{run['http_address']}/v1" in up.stdout
    yield baton, address, env, home
    down = baton("down")
    assert down.returncode == 0, down.stderr
    assert "down" in down.stdout
    assert not (home / "cache" / "run" / "cluster.json").exists()


def status(baton) -> dict:
    res = baton("status", "--output", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wait_for(pred, timeout_s: float = 60.0, what: str = "condition"):
    return wait_until(pred, timeout_s, what, poll_s=0.5)  # a poll may run `baton status`


def workers(address: str) -> list:
    """The cluster's workers as `baton status` gets them (the admin API), without its process."""
    with AdminClient(address) as admin:
        return list(admin.status().workers)


def http_completion(port: int, prompt: list[int]) -> int:
    """POST /v1/completions; the HTTP status."""
    body = json.dumps({"model": "tiny:llama", "prompt": prompt, "max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            json.load(resp)
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_up_serves_both_paths_and_status_shows_the_pools(cluster):
    baton, address, _, home = cluster
    with BatonClient(address) as client:
        short = client.complete([1, 2, 3], max_tokens=4, ignore_eos=True)
        long = client.complete(list(range(1, 80)), max_tokens=4, ignore_eos=True)
    assert (short.path, long.path) == ("local", "disaggregated") and long.kv_bytes > 0
    # The performance history says which path each request took.
    run = json.loads((home / "cache" / "run" / "cluster.json").read_text())
    history = ClusterState(run["redis_url"], "uptest")
    paths = wait_for(lambda: (p := {r.request_id: r.prefill_path for r in history.history()})
                     and {short.request_id, long.request_id} <= p.keys() and p,
                     what="both requests in the performance history")
    assert (paths[short.request_id], paths[long.request_id]) == ("local", "disaggregated")
    s = status(baton)
    assert sorted(w["role"] for w in s["workers"]) == ["decode", "prefill"]
    assert all(w["alive"] for w in s["workers"]) and s["redis"] is True
    decode = next(w for w in s["workers"] if w["role"] == "decode")
    assert decode["handoffs"] >= 1 and decode["running"] == 0
    table = baton("status")
    assert table.returncode == 0 and "decode" in table.stdout and "Redis" in table.stdout


def test_every_port_the_local_cluster_listens_on_is_on_loopback(cluster):
    _, _, _, home = cluster
    run = json.loads((home / "cache" / "run" / "cluster.json").read_text())
    assert run["ray_address"].startswith("127.0.0.1:")
    # The daemon `baton up` leaves runs Ray (GCS, raylet, its workers and agents) and Redis.
    daemon = psutil.Process(run["daemon_pid"])
    listening: dict[str, list[str]] = {}
    for proc in [daemon, *daemon.children(recursive=True)]:
        try:
            conns, name = proc.net_connections(kind="tcp"), proc.name()
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                listening.setdefault(name, []).append(c.laddr.ip)
    assert {"gcs_server", "raylet", "redis-server"} <= listening.keys(), listening
    exposed = {name: ips for name, ips in listening.items()
               if not all(_loopback(ip) for ip in ips)}
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_the_router_and_the_workers_run_at_full_cpu_priority(cluster):
    # Ray starts its worker processes at niceness 15; a router left there beside busy workers
    # held new requests back for up to a second. The controller may stay in the background.
    _, _, _, home = cluster
    run = json.loads((home / "cache" / "run" / "cluster.json").read_text())
    niceness: dict[str, list[int]] = {}
    for proc in psutil.Process(run["daemon_pid"]).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            if title.startswith("ray::"):
                niceness.setdefault(title.split()[0], []).append(proc.nice())
        except psutil.NoSuchProcess:
            continue
    assert niceness.get("ray::RouterActor") == [0], niceness
    assert niceness.get("ray::Worker") == [0, 0], niceness


def test_a_batch_job_submitted_to_the_local_cluster_runs_through_its_router(cluster, tmp_path):
    """`baton up` serves Ray's job API on loopback; `baton submit` there runs the rows through
    the cluster's own router and `baton jobs` reports the job."""
    baton, _, _, home = cluster
    run = json.loads((home / "cache" / "run" / "cluster.json").read_text())
    assert run["job_address"].startswith("http://127.0.0.1:")
    rows = [{"custom_id": f"r{i}", "prompt": list(range(1, 4 + i)), "max_tokens": 3,
             "ignore_eos": True} for i in range(5)]
    rows.insert(2, {"custom_id": "bad", "prompt": "x", "temperature": -1})
    source, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sent = baton("submit", str(source), "--output", str(out), "--follow", timeout=300)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in rows]
    for line in lines:
        if line["custom_id"] == "bad":
            assert line["response"]["status_code"] == 400 and "temperature" in \
                line["error"]["message"]
        else:
            assert line["response"]["body"]["usage"]["completion_tokens"] == 3
    listed = baton("jobs", "list", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert any(j["status"] == "SUCCEEDED" and "baton.ops.batch" in j["entrypoint"]
               for j in json.loads(listed.stdout))


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or addr).is_loopback


def test_scale_and_drain_from_the_command_line(cluster):
    baton, address, _, _ = cluster

    def ready_decodes():  # the decode workers taking requests (what `baton status` shows)
        return [w.worker_id for w in workers(address)
                if w.role == "decode" and w.state == "ready"]

    res = baton("scale", "decode", "2")
    assert res.returncode == 0 and "2 replicas" in res.stdout, res.stderr
    wait_for(lambda: len(ready_decodes()) == 2, what="a second ready decode worker")
    victim = ready_decodes()[0]
    res = baton("drain", victim)
    assert res.returncode == 0 and f"draining {victim}" in res.stdout, res.stderr
    res = baton("scale", "decode", "1")
    assert res.returncode == 0, res.stderr
    (kept,) = wait_for(lambda: (ids := ready_decodes()) and victim not in ids and ids,
                       what="one ready decode worker, not the drained one")
    wait_until(lambda: victim not in [w.worker_id for w in workers(address)], 60,
               "the drained worker gone", poll_s=0.2)
    with BatonClient(address) as client:
        assert client.complete(list(range(1, 60)), max_tokens=3).completion_tokens == 3
    assert ready_decodes() == [kept]
    bad = baton("scale", "nope", "1")
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_a_decode_worker_killed_under_load_fails_its_requests_clearly_and_is_replaced(cluster):
    baton, address, env, _ = cluster
    outcomes: list[object] = []
    stop = threading.Event()

    def load(i: int) -> None:  # one request after another until told to stop
        with BatonClient(address) as client:
            while not stop.is_set():
                try:
                    outcomes.append(client.complete([5 + i] * 20, max_tokens=300,
                                                    ignore_eos=True).finish_reason)
                except WorkerUnavailableError as exc:
                    outcomes.append(exc)
                    stop.wait(0.2)  # back off before the next request, unless told to stop

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: any(w.num_running for w in workers(address)), 60, "load")
    killed = subprocess.run([sys.executable, "-c", KILL_DECODE], capture_output=True, text=True,
                            env=env, timeout=120)
    assert killed.returncode == 0, killed.stderr
    dead_id = killed.stdout.strip()

    def replaced():
        ws = [w for w in workers(address) if w.role == "decode" and w.alive]
        return ws and ws[0].worker_id != dead_id

    wait_until(replaced, 60, "a replacement decode worker", poll_s=0.2)
    with BatonClient(address) as client:
        out = wait_until(lambda: _try(client), 60, "serving again", poll_s=0.2)
    served = len(outcomes)
    wait_until(lambda: "length" in outcomes[served:], 120, "the load served again")
    stop.set()
    for t in threads:
        t.join(120)
    assert out.finish_reason == "length"
    failed = [o for o in outcomes if isinstance(o, WorkerUnavailableError)]
    assert failed and all(o == "length" for o in outcomes if o not in failed)


def _try(client: BatonClient):
    try:
        return client.complete(list(range(1, 60)), max_tokens=3, ignore_eos=True)
    except WorkerUnavailableError:
        return None


def test_the_controller_killed_under_http_load_costs_no_request_and_its_workers_are_adopted(
        cluster):
    baton, address, env, home = cluster
    http = int(json.loads((home / "cache" / "run" / "cluster.json").read_text())
               ["http_address"].rsplit(":", 1)[1])
    before = sorted((w.worker_id, w.role) for w in workers(address) if w.state == "ready")
    codes: list[int] = []
    stop = threading.Event()

    def load(i: int) -> None:  # a few requests a second through the OpenAI HTTP API
        while not stop.is_set():
            codes.append(http_completion(http, [3 + i, 4, 5 + len(codes) % 7] * 6))
            stop.wait(0.2)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(codes) >= 4, 60, "load")
        # Its prompts go through the prefill worker: a fresh decode worker would count none.
        handoffs = {w.worker_id: w.handoffs for w in workers(address) if w.role == "decode"}
        assert all(handoffs.values())
        killed = subprocess.run([sys.executable, "-c", KILL_CONTROLLER], capture_output=True,
                                text=True, env=env, timeout=120)
        assert killed.returncode == 0, killed.stderr
        refused: list[WorkerUnavailableError] = []  # UNAVAILABLE, as `baton status` gets it

        def adopted():
            try:
                return sorted((w.worker_id, w.role) for w in workers(address)
                              if w.state == "ready")
            except WorkerUnavailableError as exc:
                refused.append(exc)
                return None

        after = wait_until(adopted, 120, "the restarted controller", poll_s=0.2)
        served = len(codes)
        wait_until(lambda: len(codes) >= served + 4, 60, "load after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert after == before  # the same workers, adopted: the same processes, not new ones
    assert all(w.handoffs >= handoffs[w.worker_id] for w in workers(address)
               if w.role == "decode")
    assert codes and set(codes) == {200}, codes
    assert all("restarting" in exc.message for exc in refused)
    # The restarted controller scales and drains.
    with AdminClient(address) as admin:
        assert admin.scale("decode", 2) == 2
        wait_until(lambda: len([w for w in workers(address) if w.role == "decode"
                                and w.state == "ready"]) == 2, 120, "a second decode worker")
        assert admin.scale("decode", 1) == 1
    wait_until(lambda: len([w for w in workers(address) if w.role == "decode"]) == 1, 120,
               "the surplus decode worker drained")
    with BatonClient(address) as client:
        assert client.complete(list(range(1, 60)), max_tokens=3).completion_tokens == 3


def test_redis_stopped_and_restarted_under_load_costs_no_request(cluster):
    baton, address, _, home = cluster
    data = home / "redis"
    assert stop_redis(data)
    with BatonClient(address) as client:
        during = [client.complete([7, 8, 9 + i], max_tokens=3, ignore_eos=True)
                  for i in range(5)]
    assert all(o.finish_reason == "length" for o in during)
    wait_for(lambda: status(baton)["redis"] is False, what="the router noticing")
    restarted = RedisServer(data)  # same data dir: same port and password
    url = restarted.start()
    try:
        with BatonClient(address) as client:
            def served_and_journaled():
                rid = client.complete([1, 2], max_tokens=2).request_id
                return rid in {e.request_id for e in ClusterState(url, "uptest").events(50)}

            wait_for(served_and_journaled, timeout_s=60, what="the journal resuming")
        assert status(baton)["redis"] is True
    finally:
        restarted.stop()
