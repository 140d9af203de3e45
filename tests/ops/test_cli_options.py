"""Options the `baton` commands refuse before doing anything: a bad `--output`, a cluster config
with a typo in a pool's engine options (real subprocesses, as an operator runs them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BATON = str(Path(sys.executable).parent / "baton")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([BATON, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def said(res: subprocess.CompletedProcess) -> str:
    """stderr as one line: without the box and the line breaks rich draws around errors."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.stderr).split())


@pytest.mark.parametrize("command", [["generate", "hi", "--model", "tiny:llama"], ["status"]])
def test_output_is_text_or_json_for_every_command(command):
    for flag in ("--output", "-o"):
        res = run(*command, flag, "xml")
        assert res.returncode == 2, res.stderr
        assert "'xml' is not one of 'text', 'json'" in said(res), res.stderr
        assert "Traceback" not in res.stderr


def test_a_typo_in_a_pools_engine_options_fails_up_before_anything_starts(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("model: tiny:llama\n"
                      "pools:\n"
                      "  - name: both\n"
                      "    role: both\n"
                      "    engine: {block_size: 8, max_num_seqz: 4}\n")
    cache = tmp_path / "cache"
    res = run("up", "-c", str(config), env={"BATON_CACHE": str(cache)})
    assert res.returncode == 2, res.stdout + res.stderr
    assert ("invalid cluster config: pools[0].engine.max_num_seqz is not a known field"
            in said(res)), res.stderr
    assert "Traceback" not in res.stderr
    assert not (cache / "run").exists()  # no Ray, no Redis, no state left to clean up


def loaded_after(code: str, env: dict[str, str] | None = None) -> list[str]:
    """Which of the heavy libraries a fresh interpreter has loaded after running `code`."""
    probe = (f"{code}\nimport sys\nprint(' '.join(m for m in ('ray', 'kubernetes', 'torch', "
             "'numpy', 'transformers', 'grpc') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_the_command_line_starts_without_the_heavy_libraries(tmp_path):
    # `baton --help` or a typo should not wait for the planner, the Kubernetes client, Ray or
    # PyTorch: the commands that need them import them when they run.
    assert loaded_after("import baton.ops.cli") == []
    # `status`, `drain` and `scale` read what `baton up` recorded and call the router over gRPC.
    reach_router = ("from baton.ops.cluster_cmds import _admin\n"
                    "from baton.errors import ClusterNotRunningError\n"
                    "try:\n    _admin()\nexcept ClusterNotRunningError:\n    pass")
    assert loaded_after(reach_router, {"BATON_CACHE": str(tmp_path)}) == ["grpc"]
