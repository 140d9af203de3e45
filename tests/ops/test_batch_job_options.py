"""What `baton submit` sends without a job server: the token it chooses, the paths the job sees,
its entrypoint, and the errors when there is nothing to talk to."""

from __future__ import annotations

import shlex
import sys

import pytest

from baton.cluster.local_record import LocalCluster
from baton.errors import ConfigError, JobServerError
from baton.ops.batch import parser
from baton.ops.jobs_client import JobServer, batch_entrypoint, job_paths, job_token
from baton.ports import free_port


@pytest.fixture
def local_record(tmp_path, monkeypatch):
    """A local cluster record (as `baton up` writes it) holding a Ray token."""
    monkeypatch.setenv("BATON_CACHE", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    LocalCluster(ray_address="127.0.0.1:6379", ray_token="local-ray-token",
                 redis_url=None, grpc_address="127.0.0.1:50051", http_address=None,
                 token=None, daemon_pid=None, redis_data_dir=None).save()


def test_the_local_ray_token_goes_only_to_a_job_server_on_this_machine(local_record,
                                                                         monkeypatch):
    assert job_token("http://127.0.0.1:8265", None) == "local-ray-token"
    assert job_token("http://head.example:8265", None) is None
    assert job_token("http://head.example:8265", "given") == "given"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert job_token("http://127.0.0.1:8265", None) == "from-env"


def test_a_local_job_gets_absolute_paths_and_this_python(tmp_path, monkeypatch):
    (tmp_path / "in.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    src, dst, python = job_paths("http://127.0.0.1:8265", "in.jsonl", "out/res.jsonl")
    assert (src, dst, python) == (str(tmp_path / "in.jsonl"), str(tmp_path / "out/res.jsonl"),
                                  sys.executable)
    # On a remote head the paths are the head's own.
    assert job_paths("http://head:8265", "in.jsonl", "o.jsonl") == ("in.jsonl", "o.jsonl",
                                                                    "python")
    with pytest.raises(ConfigError, match="does not exist"):
        job_paths("http://127.0.0.1:8265", "missing.jsonl", "o.jsonl")


def test_the_entrypoint_is_the_batch_module_and_parses_back(tmp_path):
    entry = batch_entrypoint("/d/in put.jsonl", "/d/out.jsonl", ["--model", "tiny:llama"])
    argv = shlex.split(entry)
    assert argv[:3] == ["python", "-m", "baton.ops.batch"]
    args = parser().parse_args(argv[3:])
    assert (str(args.input), str(args.output), args.model) == ("/d/in put.jsonl",
                                                              "/d/out.jsonl", "tiny:llama")


def test_no_job_server_says_how_to_start_one(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(JobServerError, match="ray start --head"):
        JobServer(f"http://127.0.0.1:{free_port()}", token="t")


def test_a_call_waits_for_a_job_agent_that_is_still_starting(monkeypatch):
    """Ray answers 500 "try again later" until the head's job agent is up: the call is tried
    again (here twice) and returns; an agent that never comes up, or any other error, raises."""
    import baton.ops.jobs_client as jobs_client

    server = JobServer.__new__(JobServer)  # no Ray client needed to test its call
    server.address = "http://127.0.0.1:8265"
    monkeypatch.setattr(jobs_client.time, "sleep", lambda _s: None)
    not_yet = RuntimeError("Request failed with status code 500: No available agent to submit "
                           "job, please try again later..")
    answers: list[object] = [not_yet, not_yet, "raysubmit_1"]

    def submit() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    assert server.call(submit) == "raysubmit_1" and answers == []
    monkeypatch.setattr(jobs_client, "AGENT_WAIT_S", 0.0)
    answers[:] = [not_yet, "too late"]
    with pytest.raises(RuntimeError, match="try again later"):
        server.call(submit)
    answers[:] = [RuntimeError("status code 400: bad entrypoint"), "never"]
    with pytest.raises(RuntimeError, match="bad entrypoint"):
        server.call(submit)
