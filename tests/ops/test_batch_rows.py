"""Batch rows, output and resume without Ray: what a data engineer's file turns into.

The runner is driven by a fake backend (named so) that answers each row from its prompt, fails
chosen rows like a dying worker would, and completes rows out of order.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from baton.errors import ConfigError, ContextLengthError, WorkerUnavailableError
from baton.ops.batch_output import Generation, done_ids
from baton.ops.batch_rows import CHAT_URL, COMPLETIONS_URL, BadRow, BatchRow, parse_rows
from baton.ops.batch_runner import BatchRunner, BatchSettings


def openai_row(custom_id: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT_URL,
                       "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                **body}})


def test_both_row_shapes_become_requests_with_their_sampling():
    rows = parse_rows([
        openai_row("a", max_tokens=5, temperature=0.5, stop="\n"),
        json.dumps({"custom_id": "b", "prompt": "Once", "max_tokens": 7, "seed": 3}),
        json.dumps({"messages": [{"role": "user", "content": "hey"}]}),
        json.dumps({"custom_id": "d", "method": "POST", "url": COMPLETIONS_URL,
                    "body": {"model": "m", "prompt": "x"}}),
    ])
    a, b, c, d = rows
    assert isinstance(a, BatchRow) and a.url == CHAT_URL
    assert a.request.prompt == [{"role": "user", "content": "hi"}]
    assert (a.request.params.max_tokens, a.request.params.temperature) == (5, 0.5)
    assert a.request.params.stop == ["\n"]
    assert isinstance(b, BatchRow) and b.url == COMPLETIONS_URL and b.request.prompt == "Once"
    assert (b.request.params.max_tokens, b.request.params.seed) == (7, 3)
    # Baton's rows take Baton's defaults (greedy, 128 tokens); OpenAI's take OpenAI's.
    assert isinstance(c, BatchRow) and c.custom_id == "row-2" and c.url == CHAT_URL
    assert (c.request.params.temperature, c.request.params.max_tokens) == (0.0, 128)
    assert isinstance(d, BatchRow)
    assert (d.request.params.temperature, d.request.params.max_tokens) == (1.0, 16)


@pytest.mark.parametrize(("line", "param", "words"), [
    ("{not json", None, "not JSON"),
    ("[1, 2]", None, "not an object"),
    (json.dumps({"prompt": "x", "max_token": 3}), "max_token", "unknown field 'max_token'"),
    (json.dumps({"prompt": "x", "temperature": -1}), None, "temperature must be"),
    (json.dumps({"prompt": "x", "messages": []}), "prompt", "exactly one of prompt"),
    (json.dumps({"custom_id": 7, "prompt": "x"}), "custom_id", "custom_id must be"),
    (openai_row("z").replace('"POST"', '"GET"'), "method", "method must be POST"),
    (openai_row("z").replace(CHAT_URL, "/v1/embeddings"), "url", "url must be"),
    (openai_row("z", stream=True), "stream", "stream must be false"),
    (openai_row("z", n=2), "n", "n=1"),
    (json.dumps({"prompt": "x", "max_tokens": "ten"}), "max_tokens", "an integer"),
])
def test_a_bad_row_says_what_to_change(line, param, words):
    [row] = parse_rows([line])
    assert isinstance(row, BadRow)
    assert words in row.message
    assert row.param == param


def test_a_reused_custom_id_is_an_error_under_a_name_of_its_own():
    rows = parse_rows([json.dumps({"custom_id": "a", "prompt": "x"}), "",
                       json.dumps({"custom_id": "a", "prompt": "y"})])
    assert [r.custom_id for r in rows] == ["a", "row-2"]
    assert isinstance(rows[1], BadRow) and "already used on line 1" in rows[1].message


class FakeBackend:
    """Answers `echo:<prompt>` after a delay that makes later rows finish first; `dies` maps a
    prompt to how many attempts fail as if its worker died; `too_long` prompts fail for good."""

    def __init__(self, dies: dict[str, int] | None = None, too_long: tuple[str, ...] = ()):
        self.dies = dict(dies or {})
        self.too_long = too_long
        self.calls: list[str] = []

    async def start(self) -> None:
        pass

    async def generate(self, row: BatchRow, request_id: str) -> Generation:
        prompt = row.request.prompt
        assert isinstance(prompt, str)
        self.calls.append(prompt)
        await asyncio.sleep(0.01 * (10 - int(prompt[1:]) % 10))  # later rows finish first
        if self.dies.get(prompt, 0) > 0:
            self.dies[prompt] -= 1
            raise WorkerUnavailableError("the worker died")
        if prompt in self.too_long:
            raise ContextLengthError("prompt too long for the model; shorten it")
        return Generation(f"echo:{prompt}", "length", 1, 2, "fake")

    async def close(self) -> None:
        pass


def write_input(path: Path, n: int, extra: list[str] = ()) -> None:
    lines = [json.dumps({"custom_id": f"id{i}", "prompt": f"p{i}"}) for i in range(n)]
    path.write_text("\n".join([*lines, *extra]) + "\n")


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp: Path, backend: FakeBackend, **settings) -> list[dict]:
    runner = BatchRunner(tmp / "in.jsonl", tmp / "out.jsonl", backend,
                         BatchSettings(retry_delay_s=0, **settings))
    asyncio.run(runner.run())
    return read_output(tmp / "out.jsonl")


def test_results_come_in_input_order_in_openai_batch_shape(tmp_path):
    write_input(tmp_path / "in.jsonl", 30, extra=["{oops"])
    out = run(tmp_path, FakeBackend(), concurrency=8)
    assert [o["custom_id"] for o in out] == [f"id{i}" for i in range(30)] + ["row-30"]
    first = out[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "echo:p0"
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert out[-1]["response"]["status_code"] == 400
    assert "not JSON" in out[-1]["error"]["message"]


def test_a_dying_worker_is_retried_and_a_hopeless_row_errs_alone(tmp_path):
    write_input(tmp_path / "in.jsonl", 6)
    backend = FakeBackend(dies={"p1": 2, "p2": 5}, too_long=("p3",))
    out = {o["custom_id"]: o for o in run(tmp_path, backend, concurrency=3, max_attempts=3)}
    assert out["id1"]["response"]["body"]["choices"][0]["text"] == "echo:p1"  # third attempt
    assert backend.calls.count("p1") == 3
    assert backend.calls.count("p2") == 3 and out["id2"]["response"]["status_code"] == 503
    assert "gave up after 3 attempts" in out["id2"]["error"]["message"]
    assert out["id3"]["error"]["code"] == "context_length_exceeded"
    assert all(out[f"id{i}"]["error"] is None for i in (0, 4, 5))


def test_a_rerun_skips_rows_already_written_and_keeps_input_order(tmp_path):
    write_input(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out.jsonl"
    run(tmp_path, FakeBackend())
    lines = out.read_text().splitlines(keepends=True)
    # A job stopped mid-write: four rows written, the fifth cut short.
    out.write_text("".join(lines[:4]) + lines[4][:25])
    backend = FakeBackend()
    result = run(tmp_path, backend)
    assert [o["custom_id"] for o in result] == [f"id{i}" for i in range(10)]
    assert sorted(backend.calls) == sorted(f"p{i}" for i in range(4, 10))
    assert run(tmp_path, FakeBackend()) == result  # nothing left to do: nothing changes


def test_done_ids_refuses_an_output_that_is_not_batch_results(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"something": "else"}\n')
    with pytest.raises(Exception, match="not a batch result"):
        done_ids(out)


def test_a_missing_input_says_so(tmp_path):
    runner = BatchRunner(tmp_path / "nope.jsonl", tmp_path / "out.jsonl", FakeBackend())
    with pytest.raises(ConfigError, match="does not exist"):
        asyncio.run(runner.run())
