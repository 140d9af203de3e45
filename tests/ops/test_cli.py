"""`baton generate` as a user runs it: a real subprocess, streamed text, JSON, clear errors."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

BATON = [str(Path(sys.executable).parent / "baton")]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*BATON, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def run_twice(*args: str, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """The same command in two processes at once (their seconds of imports overlap)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: run(*args, timeout=timeout), range(2)))


def test_generate_streams_an_answer_from_the_default_model():
    res = run("generate", "What is the capital of France? Answer in one word.", "--chat",
              "--max-tokens", "12", "--threads", "2")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_generate_json_with_sampling_options_is_reproducible():
    args = ["generate", "Tell me a story.", "--chat", "--max-tokens", "16", "--temperature",
            "0.9", "--top-p", "0.9", "--top-k", "40", "--seed", "3", "--output", "json",
            "--logprobs", "2"]
    first, second = run_twice(*args)
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert a["usage"]["completion_tokens"] == len(a["token_ids"]) <= 16
    assert a["finish_reason"] in ("stop", "length")
    assert len(a["logprobs"]) == len(a["token_ids"])
    assert a["model"] == "SmolLM2-135M-Instruct"


def test_stop_strings_end_the_answer_where_the_first_one_appears():
    args = ["generate", "abc", "--model", "tiny:qwen2", "--max-tokens", "30", "--output", "json"]
    free = run(*args)
    assert free.returncode == 0, free.stderr
    text = json.loads(free.stdout)["text"]
    # Two characters of the free answer, each first seen past its start, as stop strings.
    picks = [c for c in dict.fromkeys(text) if c.isascii() and c.isalnum() and text.index(c) > 2]
    assert len(picks) >= 2, text
    res = run(*args, "--stop", picks[1], "--stop", picks[0])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[: text.index(picks[0])]


def test_bad_input_exits_2_with_a_message_that_says_what_to_change():
    for args, says in [
        (["generate", "", "--model", "tiny:llama"], "prompt is empty"),
        (["generate", "hi", "--model", "tiny:llama", "--max-tokens", "0"], "max_tokens"),
        (["generate", "hi", "--model", "/nope/model"], "not found"),
        (["generate", "hi", "--model", "tiny:llama", "--output", "xml"], "--output"),
    ]:
        res = run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert says in res.stderr.replace("\n", " "), res.stderr
        assert "Traceback" not in res.stderr
