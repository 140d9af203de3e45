"""`python -m baton.ops.batch INPUT.jsonl --output OUT.jsonl`: offline batch generation.

The entry point of a Ray job (`baton submit`, `ray job submit -- python -m baton.ops.batch ...`,
the Helm chart's RayJob), and a plain command too. Rows go to a cluster's router (`--router`,
else `BATON_ROUTER_ADDRESS`, else the local cluster `baton up` recorded), or, with `--model` or
`--config`, to worker actors the job starts on its Ray cluster (the one it runs in, or a local
one). Row and output formats, resume and retries: `batch_rows`, `batch_output`, `batch_runner`.
The job exits 0 once every row has a line, failed rows included; 2 when it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import ray

from baton.cluster.config import ClusterConfig, load_config
from baton.cluster.local_record import LocalCluster
from baton.errors import BatonError, ClusterNotRunningError
from baton.ops.batch_backends import Backend, RouterBackend
from baton.ops.batch_runner import BatchReport, BatchRunner, BatchSettings
from baton.ops.batch_workers import WorkerBackend

log = logging.getLogger(__name__)

ROUTER_ENV = "BATON_ROUTER_ADDRESS"
TOKEN_ENV = "BATON_API_TOKEN"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m baton.ops.batch",
        description="Run every line of a JSONL file through Baton; results as JSONL, in input "
        "order, one per custom_id. A rerun skips rows already in the output.")
    p.add_argument("input", type=Path, help="JSONL rows: OpenAI batch or Baton shape")
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="JSONL results (appended to when it exists: the run resumes)")
    where = p.add_argument_group("where rows run (default: the cluster's router)")
    where.add_argument("--router", default=os.environ.get(ROUTER_ENV),
                       help=f"router gRPC address host:port (env {ROUTER_ENV}; default: the "
                       "local cluster `baton up` started)")
    where.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                       help=f"the router's API token (env {TOKEN_ENV})")
    where.add_argument("--model", help="run on the job's own workers with this model "
                       "('default', a transformers directory, a .gguf file, a hub id, tiny:<arch>)")
    where.add_argument("--config", help="run on the job's own workers: the decode/both pools "
                       "of this cluster YAML")
    where.add_argument("--workers", type=int, default=1, help="with --model: worker actors")
    where.add_argument("--cpus-per-worker", type=float, default=1.0,
                       help="with --model: Ray CPUs (and engine threads) per worker")
    where.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="with --model: GPUs per worker (> 0 runs on cuda)")
    where.add_argument("--dtype", default="auto", help="with --model: auto (this machine's "
                       "fastest), bfloat16, float16, float32")
    run = p.add_argument_group("how rows run")
    run.add_argument("--concurrency", type=int, default=16, help="rows in flight at once")
    run.add_argument("--max-attempts", type=int, default=3,
                     help="attempts per row when its worker dies or the cluster is full")
    run.add_argument("--progress-every", type=float, default=10.0,
                     help="seconds between progress lines in the log")
    return p


def worker_config(args: argparse.Namespace) -> ClusterConfig | None:
    """The pools of the job's own workers, or None to use a router."""
    if args.config:
        return load_config(args.config)
    if not args.model:
        return None
    gpus = args.gpus_per_worker
    return load_config({"model": args.model, "pools": [{
        "name": "batch", "role": "both", "replicas": args.workers, "dtype": args.dtype,
        "num_cpus": args.cpus_per_worker, "num_gpus": gpus,
        "device": "cuda" if gpus > 0 else "cpu"}]})


def router_backend(args: argparse.Namespace) -> RouterBackend:
    address, token = args.router, args.token
    if not address:
        try:
            cluster = LocalCluster.load()
        except ClusterNotRunningError:
            raise ClusterNotRunningError(
                f"no router to send rows to: pass --router HOST:PORT (or set {ROUTER_ENV}), "
                "start a local cluster with `baton up`, or run on the job's own workers with "
                "--model") from None
        address, token = cluster.grpc_address, token or cluster.token
    return RouterBackend(address, token)


def backend_for(args: argparse.Namespace) -> Backend:
    config = worker_config(args)
    if config is None:
        return router_backend(args)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)  # the job's cluster (RAY_ADDRESS), or a local one
    return WorkerBackend(config)


def run(argv: list[str] | None = None) -> BatchReport:
    args = parser().parse_args(argv)
    settings = BatchSettings(concurrency=args.concurrency, max_attempts=args.max_attempts,
                             progress_every_s=args.progress_every)
    runner = BatchRunner(args.input, args.output, backend_for(args), settings)
    return asyncio.run(runner.run())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    try:
        report = run()
    except BatonError as exc:
        log.error("%s: %s", type(exc).__name__, exc.message)
        sys.exit(2)
    log.info("%d rows written to the output now (%d were there already), %d with errors",
             report.written, report.skipped, report.errors)


if __name__ == "__main__":
    main()
