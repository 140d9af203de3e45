"""`baton submit` and `baton jobs list|status|logs|stop`: batch generation as Ray jobs.

`submit` hands Ray's job server the entrypoint `python -m baton.ops.batch INPUT --output OUT
...` (what `ray job submit -- python -m baton.ops.batch ...` runs too); the job's logs show its
progress. Where the job server is and how it is authenticated: `jobs_client`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from baton.errors import JobServerError
from baton.ops.cli_options import Output, OutputOpt

if TYPE_CHECKING:
    from baton.ops.jobs_client import JobServer

AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray job server, http://HOST:8265 (env RAY_API_SERVER_ADDRESS; default: "
    "the local cluster's, else http://127.0.0.1:8265)")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", help="Ray auth token (env RAY_AUTH_TOKEN; default: the local cluster's)")]
JobArg = Annotated[str, typer.Argument(help="Submission id (see baton jobs list)")]

jobs_app = typer.Typer(help="Ray jobs on a cluster: list, status, logs, stop.",
                       no_args_is_help=True)


def job_record(details: Any) -> dict[str, Any]:
    """What `jobs list` and `jobs status` show of one job (Ray's `JobDetails`)."""
    return {"job_id": details.submission_id or details.job_id, "status": str(details.status),
            "entrypoint": details.entrypoint, "start_time": _when(details.start_time),
            "end_time": _when(details.end_time), "message": details.message}


def _when(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else None


def _client() -> ModuleType:
    """The job server's client, imported on first use: it brings Ray's job SDK and the local
    cluster's modules (torch among them), which `baton --help` and every other command skip."""
    from baton.ops import jobs_client

    return jobs_client


def follow_logs(server: JobServer, job_id: str) -> None:
    """Print the job's logs as they come, until it ends."""
    server.status(job_id)  # an unknown id fails here, with a clear error

    async def tail() -> None:
        async for chunk in server.client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log stream broke: the server went away
        raise JobServerError(f"lost the job's log stream from {server.address} ({exc}); "
                             f"`baton jobs logs {job_id} --follow` picks it up again") from None


def _exit_with(server: JobServer, job_id: str) -> None:
    status = server.status(job_id)
    typer.echo(f"job {job_id}: {status}", err=True)
    if str(status) != "SUCCEEDED":
        raise typer.Exit(1)


def submit(
    input_path: Annotated[str, typer.Argument(metavar="INPUT", help="JSONL input (rows)")],
    output_path: Annotated[str, typer.Option("--output", help="JSONL results (resumes when "
                                             "it exists)")],
    address: AddressOpt = None,
    token: TokenOpt = None,
    follow: Annotated[bool, typer.Option(help="Print the job's logs until it ends")] = False,
    model: Annotated[str | None, typer.Option(
        help="Run on the job's own workers with this model (default: the cluster's router)")
    ] = None,
    config: Annotated[str | None, typer.Option(
        help="Run on the job's own workers: this cluster YAML's decode/both pools")] = None,
    workers: Annotated[int, typer.Option(help="With --model: worker actors")] = 1,
    router: Annotated[str | None, typer.Option(
        help="Router gRPC host:port (default: the local cluster's)")] = None,
    router_token: Annotated[str | None, typer.Option(
        help="The router's API token (passed to the job in its environment)")] = None,
    concurrency: Annotated[int, typer.Option(help="Rows in flight at once")] = 16,
    max_attempts: Annotated[int, typer.Option(help="Attempts per row when a worker dies")] = 3,
    job_id: Annotated[str | None, typer.Option(help="Submission id (default: Ray's)")] = None,
    fmt: Annotated[Output, typer.Option("--format", help="text or json (the job's id)")
                   ] = Output.text,
) -> None:
    """Run a JSONL file through Baton as a Ray job; results as JSONL in input order."""
    jc = _client()
    where = jc.job_address(address)
    src, dst, python = jc.job_paths(where, input_path, output_path)  # a missing input fails first
    server = jc.JobServer(where, token)
    options = ["--concurrency", str(concurrency), "--max-attempts", str(max_attempts)]
    if model:
        options += ["--model", model, "--workers", str(workers)]
    if config:
        options += ["--config", config]
    if not (model or config or router):
        router, router_token = jc.local_router(where, router_token)
    if router:
        options += ["--router", router]
    runtime_env = {"env_vars": {"BATON_API_TOKEN": router_token}} if router_token else None
    entrypoint = jc.batch_entrypoint(src, dst, options, python)
    submitted = server.call(server.client.submit_job, entrypoint=entrypoint,
                            submission_id=job_id, runtime_env=runtime_env,
                            metadata={"baton": "batch", "output": dst})
    if fmt is Output.json:
        typer.echo(json.dumps({"job_id": submitted, "entrypoint": entrypoint,
                               "address": server.address}))
    else:
        typer.echo(f"submitted job {submitted}; follow it with `baton jobs logs {submitted} "
                   "--follow`", err=follow)
    if follow:
        follow_logs(server, submitted)
        _exit_with(server, submitted)


@jobs_app.command("list")
def list_jobs(address: AddressOpt = None, token: TokenOpt = None,
              output: OutputOpt = Output.text) -> None:
    """Every job the job server knows, oldest first."""
    server = _client().JobServer(address, token)
    jobs = sorted(server.call(server.client.list_jobs), key=lambda d: d.start_time or 0)
    rows = [job_record(d) for d in jobs]
    if output is Output.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Ray jobs at {server.address}")
    for col in ("job", "status", "started", "entrypoint"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["job_id"], r["status"], r["start_time"] or "", r["entrypoint"])
    Console().print(table)


@jobs_app.command("status")
def job_status(job_id: JobArg, address: AddressOpt = None, token: TokenOpt = None,
               output: OutputOpt = Output.text) -> None:
    """One job's status, times and entrypoint."""
    server = _client().JobServer(address, token)
    record = job_record(server.call(server.client.get_job_info, job_id, job_id=job_id))
    if output is Output.json:
        typer.echo(json.dumps(record, indent=2))
        return
    for key, value in record.items():
        typer.echo(f"{key}: {value if value is not None else '-'}")


@jobs_app.command("logs")
def job_logs(job_id: JobArg, address: AddressOpt = None, token: TokenOpt = None,
             follow: Annotated[bool, typer.Option(help="Keep printing until the job ends")
                               ] = False) -> None:
    """A job's logs (its progress lines included)."""
    server = _client().JobServer(address, token)
    if follow:
        follow_logs(server, job_id)
        return
    sys.stdout.write(server.call(server.client.get_job_logs, job_id, job_id=job_id))


@jobs_app.command("stop")
def job_stop(job_id: JobArg, address: AddressOpt = None, token: TokenOpt = None,
             wait: Annotated[float, typer.Option(
                 help="Seconds to wait for the job to end (0: do not wait)")] = 60.0,
             output: OutputOpt = Output.text) -> None:
    """Stop a job (a batch job resumes where it stopped when submitted again)."""
    server = _client().JobServer(address, token)
    stopping = server.call(server.client.stop_job, job_id, job_id=job_id)
    status = server.status(job_id)
    deadline = time.monotonic() + wait
    while status not in _client().TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)  # polling the job server's state, with a deadline
        status = server.status(job_id)
    if output is Output.json:
        typer.echo(json.dumps({"job_id": job_id, "was_running": stopping,
                               "status": str(status)}))
    else:
        typer.echo(f"job {job_id}: {status}" if stopping else
                   f"job {job_id} was not running ({status})")


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.add_typer(jobs_app, name="jobs")
