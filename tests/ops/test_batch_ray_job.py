"""Batch jobs on a real Ray head with its job server on loopback, under Ray's token auth, driven
through the `baton` CLI (`submit`, `jobs list|status|logs|stop`) with a tiny random-weight model.

One head for the module (`ray start --head --block` in a session of its own, every port chosen
here so that other Ray instances on the machine are untouched; its process group is ended at
teardown). The job runs this repository's Python, as `baton submit` does for a local server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from baton.errors import AuthError, JobNotFoundError, JobServerError
from baton.ops.cli import app
from baton.ops.jobs_client import JobServer
from baton.ports import free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.ray  # starts Ray (see tests/conftest.py)

TOKEN = "batch-test-ray-token-0123456789abcdef"
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
              "--object-manager-port")


@pytest.fixture(scope="module")
def head() -> Iterator[dict[str, Any]]:
    """A Ray head with token auth and its job server; yields the address and a scratch dir."""
    tmp = Path(tempfile.mkdtemp(prefix="bj", dir="/tmp"))  # short: Ray's socket paths
    ports = {flag: free_port() for flag in PORT_FLAGS}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",
                                                             "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, BATON_CACHE=str(tmp / "cache"),
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--num-cpus", "2", "--temp-dir", str(tmp / "ray"), "--include-dashboard", "true",
           "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    with open(tmp / "head.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"

    def job_server_up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited: {(tmp / 'head.log').read_text()[-3000:]}")
        try:
            JobServer(address, TOKEN)
        except JobServerError:
            return False
        return True

    try:
        wait_until(job_server_up, timeout_s=180, what="the Ray head's job server", poll_s=1)
        yield {"address": address, "tmp": tmp}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the head is left
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def baton(head: dict[str, Any], *args: str) -> Any:
    """`baton ARGS --address HEAD --token TOKEN` in this process; its result (output, exit code,
    exception)."""
    return cli().invoke(app, [*args, "--address", head["address"], "--token", TOKEN])


def cli() -> CliRunner:
    """A runner whose environment names no other Ray (Ray's job client prefers it over
    --address)."""
    return CliRunner(env={"RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None})


def write_rows(path: Path, n: int, max_tokens: int, bad: dict[int, str] | None = None) -> None:
    lines = [json.dumps({"custom_id": f"q{i}", "prompt": f"Row {i} says", "max_tokens": max_tokens,
                         "ignore_eos": True}) for i in range(n)]
    for i, line in (bad or {}).items():
        lines[i] = line
    path.write_text("\n".join(lines) + "\n")


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n")]


def submit(head: dict[str, Any], src: Path, dst: Path, *extra: str) -> str:
    res = baton(head, "submit", str(src), "--output", str(dst), "--model", "tiny:llama",
                "--workers", "2", "--format", "json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.splitlines()[0])["job_id"]


def logs(head: dict[str, Any], job: str) -> str:
    res = baton(head, "jobs", "logs", job)
    assert res.exit_code == 0, res.output
    return res.stdout


def status(head: dict[str, Any], job: str) -> str:
    res = baton(head, "jobs", "status", job, "--output", "json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["status"]


def test_a_200_row_job_with_bad_rows_and_a_killed_worker_writes_every_row_in_order(head):
    src, dst = head["tmp"] / "in200.jsonl", head["tmp"] / "out200.jsonl"
    bad = {17: "{this is not json", 42: json.dumps({"prompt": "x", "max_token": 4}),
           99: json.dumps({"custom_id": "q3", "prompt": "again"}),
           150: json.dumps({"prompt": "x", "temperature": -2})}
    write_rows(src, 200, max_tokens=24, bad=bad)
    job = submit(head, src, dst, "--concurrency", "4")
    # Kill one of the job's workers once rows are flowing.
    pids = wait_until(lambda: re.findall(r"worker \d+ up \(pid (\d+)\)", logs(head, job)),
                      timeout_s=180, what="the job's workers to start", poll_s=0.5)
    wait_until(lambda: len(read_lines(dst)) >= 20, timeout_s=120, what="20 rows written")
    assert status(head, job) == "RUNNING"
    os.kill(int(pids[0]), signal.SIGKILL)

    res = baton(head, "jobs", "logs", job, "--follow")
    assert res.exit_code == 0, res.output
    assert status(head, job) == "SUCCEEDED"
    text = logs(head, job)
    assert "starting a replacement" in text and "200/200 rows" in text

    out = read_lines(dst)
    expected = [f"q{i}" if i not in bad else f"row-{i}" for i in range(200)]
    assert [o["custom_id"] for o in out] == expected
    failed = {o["custom_id"]: o["error"]["message"] for o in out if o["error"]}
    assert set(failed) == {f"row-{i}" for i in bad}  # a killed worker fails no row
    assert "not JSON" in failed["row-17"] and "max_token" in failed["row-42"]
    assert "'q3' is already used" in failed["row-99"] and "temperature" in failed["row-150"]
    done = [o for o in out if not o["error"]]
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 24 for o in done)

    listed = baton(head, "jobs", "list", "--output", "json")
    assert job in [j["job_id"] for j in json.loads(listed.stdout)]


def test_a_stopped_job_resumes_without_redoing_rows(head):
    src, dst = head["tmp"] / "in60.jsonl", head["tmp"] / "out60.jsonl"
    write_rows(src, 60, max_tokens=48)
    job = submit(head, src, dst, "--concurrency", "2")
    wait_until(lambda: len(read_lines(dst)) >= 5, timeout_s=180, what="5 rows written")
    res = baton(head, "jobs", "stop", job, "--output", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"job_id": job, "was_running": True, "status": "STOPPED"}
    before = read_lines(dst)
    assert 5 <= len(before) < 60

    res = cli().invoke(app, ["submit", str(src), "--output", str(dst), "--model",
                                   "tiny:llama", "--follow", "--address", head["address"],
                                   "--token", TOKEN])
    assert res.exit_code == 0, res.output
    assert f"resuming: {len(before)} of 60 rows" in res.output
    after = read_lines(dst)
    assert [o["custom_id"] for o in after] == [f"q{i}" for i in range(60)]
    assert after[:len(before)] == before  # the rows done before the stop were not redone
    assert not any(o["error"] for o in after)


def test_unknown_jobs_and_wrong_tokens_are_told_apart(head):
    res = baton(head, "jobs", "status", "raysubmit_nosuchjob")
    assert isinstance(res.exception, JobNotFoundError), res.output
    assert "baton jobs list" in res.exception.message
    wrong = cli().invoke(app, ["jobs", "list", "--address", head["address"], "--token",
                                     "not-the-token"])
    assert isinstance(wrong.exception, AuthError), wrong.output
