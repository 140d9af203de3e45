"""`baton up`, `down`, `status`, `drain`, `scale`: running a cluster from the command line."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from baton.ops.cli_options import Output, OutputOpt


def _admin():
    from baton.client import AdminClient
    from baton.cluster.local_record import LocalCluster

    cluster = LocalCluster.load()
    return AdminClient(cluster.grpc_address, token=cluster.token)


def up(
    config: Annotated[str | None, typer.Option("--config", "-c", help="Cluster YAML")] = None,
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Use this Redis")] = None,
    host: Annotated[str, typer.Option(help="Address the API binds to")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(help="gRPC API port (0: any free one)")] = 50051,
    http_port: Annotated[int, typer.Option(help="HTTP API port (0: any free one)")] = 8000,
    no_http: Annotated[bool, typer.Option("--no-http", help="No OpenAI-style HTTP API")] = False,
    token: Annotated[str | None, typer.Option(help="API token (made up beyond loopback)")] = None,
) -> None:
    """Start a cluster: Ray, Redis, the worker pools, and the router."""
    from baton.cluster import local

    console = Console()
    with console.status("starting Ray, Redis, the pools and the router"):
        cluster = local.up(config, address=address, redis_url=redis_url, host=host,
                           grpc_port=grpc_port, http_port=None if no_http else http_port,
                           token=token)
    console.print(f"[green]Baton is up[/]: gRPC {cluster.grpc_address}"
                  + (f", HTTP http://{cluster.http_address}/v1" if cluster.http_address else "")
                  + f", Ray {cluster.ray_address}")
    if cluster.job_address:
        console.print(f"Ray jobs (baton submit): {cluster.job_address}")
    if cluster.token:
        console.print(f"API token: {cluster.token}")


def down() -> None:
    """Stop the cluster `baton up` started (pools, router, Redis, Ray)."""
    from baton.cluster import local

    console = Console()
    with console.status("stopping"):
        stopped = local.down()
    console.print("[green]Baton is down[/]" if stopped else "no Baton cluster was running")


def _status_rows(resp) -> list[dict[str, Any]]:
    """One row per worker; `expert_cache` (hits, misses, hit_rate, bytes_loaded, stall_seconds)
    only on workers serving an offloaded MoE model."""
    from baton.records import ExpertCacheStatus

    fields = tuple(ExpertCacheStatus.model_fields)
    return [{"worker_id": w.worker_id, "pool": w.pool, "role": w.role, "state": w.state,
             "alive": w.alive,
             "draining": w.draining, "running": w.num_running, "waiting": w.num_waiting,
             "kv_usage": round(w.kv_usage, 4), "handoffs": w.handoffs,
             "handoff_failures": w.handoff_failures,
             **({"expert_cache": {f: getattr(w.expert_cache, f) for f in fields}}
                if w.HasField("expert_cache") else {})} for w in resp.workers]


def expert_cell(row: dict[str, Any]) -> str:
    """A worker's expert cache in one table cell ("" for a dense worker): hit rate, bytes loaded,
    seconds stalled."""
    e = row.get("expert_cache")
    if e is None:
        return ""
    return (f"{e['hit_rate']:.0%} hit, {e['bytes_loaded'] / 2**20:.1f} MiB loaded, "
            f"{e['stall_seconds']:.2f}s stall")


def worker_columns(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> tuple[str, ...]:
    """The table's columns, plus "experts" when some worker serves an offloaded MoE model."""
    return (*columns, "experts") if any("expert_cache" in r for r in rows) else columns


def status(output: OutputOpt = Output.text) -> None:
    """Pools, workers, load, KV usage, queue depth and recent TTFT/TPOT; for workers serving an
    offloaded MoE model, their expert cache's hit rate, bytes loaded and stall seconds."""
    with _admin() as admin:
        resp = admin.status()
    rows = _status_rows(resp)
    summary = {"queue_depth": resp.queue_depth, "in_flight": resp.in_flight,
               "ttft_p50_s": resp.ttft_p50_s, "ttft_p99_s": resp.ttft_p99_s,
               "tpot_p50_s": resp.tpot_p50_s, "tpot_p99_s": resp.tpot_p99_s,
               "redis": resp.state_available}
    if output is Output.json:
        typer.echo(json.dumps({"workers": rows, **summary}, indent=2))
        return
    table = Table(title="Baton cluster")
    columns = worker_columns(rows, ("worker", "pool", "role", "state", "running", "waiting",
                                    "KV used", "handoffs"))
    for col in columns:
        table.add_column(col)
    for r in rows:
        state = r["state"] if r["alive"] else "[red]dead[/]"
        cells = [r["worker_id"], r["pool"], r["role"], state, str(r["running"]),
                 str(r["waiting"]), f"{r['kv_usage']:.1%}",
                 f"{r['handoffs']} ({r['handoff_failures']} failed)", expert_cell(r)]
        table.add_row(*cells[:len(columns)])
    console = Console()
    console.print(table)
    console.print(f"queue {resp.queue_depth}, in flight {resp.in_flight}; TTFT p50/p99 "
                  f"{resp.ttft_p50_s * 1000:.0f}/{resp.ttft_p99_s * 1000:.0f} ms, TPOT p50/p99 "
                  f"{resp.tpot_p50_s * 1000:.0f}/{resp.tpot_p99_s * 1000:.0f} ms; Redis "
                  + ("reachable" if resp.state_available else "[yellow]unreachable[/]"))


def drain(worker_id: Annotated[str, typer.Argument(help="Worker id (see baton status)")]) -> None:
    """Stop sending a worker requests; it finishes what it has, then stops."""
    with _admin() as admin:
        n = admin.drain(worker_id)
    typer.echo(f"draining {worker_id}: {n} requests still in flight")


def scale(pool: Annotated[str, typer.Argument(help="Pool name")],
          replicas: Annotated[int, typer.Argument(help="Replicas wanted")]) -> None:
    """Set a pool's number of replicas."""
    with _admin() as admin:
        n = admin.scale(pool, replicas)
    typer.echo(f"pool {pool}: {n} replicas")


def register(app: typer.Typer) -> None:
    for fn in (up, down, status, drain, scale):
        app.command()(fn)
