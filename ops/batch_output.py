"""The batch output file: one JSON line per input row, in input order, in OpenAI's batch shape.

    {"id": "batch_req_...", "custom_id": "...", "response": {"status_code": 200,
     "request_id": "...", "body": {chat.completion or text_completion}}, "error": null}

A row that failed has the OpenAI error body under `response` (with its HTTP status) and the same
`{"code", "message", "param"}` under `error`, so `jq 'select(.error)'` finds every failed row.

Lines are written in input order as rows complete, so the file is always a prefix of the input's
rows: a rerun reads which rows are there (`done_ids`) and appends the rest, still in input order.
A line cut short by a killed job is dropped before appending.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from baton.errors import BatonError, InvalidRequestError
from baton.ops.batch_rows import CHAT_URL, BadRow, BatchRow
from baton.router.openai_api import envelope, http_error

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Generation:
    """What a backend returns for one row, whichever way it was served."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def success_line(row: BatchRow, gen: Generation) -> dict[str, Any]:
    request_id = f"{row.custom_id}-{uuid.uuid4().hex[:8]}"
    if row.url == CHAT_URL:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                          "content": gen.text}}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": gen.text}
        kind = "text_completion"
    choice.update(finish_reason=gen.finish_reason, logprobs=None)
    body = envelope(kind, request_id, gen.model, [choice])
    body["usage"] = {"prompt_tokens": gen.prompt_tokens,
                     "completion_tokens": gen.completion_tokens,
                     "total_tokens": gen.prompt_tokens + gen.completion_tokens}
    return {"id": _line_id(), "custom_id": row.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None}


def error_line(custom_id: str, exc: BatonError) -> dict[str, Any]:
    """The line of a row whose request failed (or could not be read: an InvalidRequestError)."""
    status, body = http_error(exc)
    return {"id": _line_id(), "custom_id": custom_id,
            "response": {"status_code": status, "body": body},
            "error": {k: body["error"][k] for k in ("code", "message", "param")}}


def bad_row_line(row: BadRow) -> dict[str, Any]:
    return error_line(row.custom_id, InvalidRequestError(row.message, row.param))


def done_ids(path: Path) -> Counter[str]:
    """The custom_ids already in the output (with how often), after dropping a cut-off last line.

    A missing file is an empty output. Counted, not a set: a rerun skips a row only as often as
    its id is there.
    """
    if not path.exists():
        return Counter()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything up to the last complete line
    done: Counter[str] = Counter()
    for raw in data[:keep].splitlines():
        if not raw.strip():
            continue
        try:
            done[json.loads(raw)["custom_id"]] += 1
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InvalidRequestError(
                f"{path} holds a line that is not a batch result ({raw[:80]!r}); write the "
                "output to a new file, or remove that line") from None
    if keep < len(data):
        log.warning("dropping a cut-off last line of %s (%d bytes) before resuming", path,
                    len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
    return done


class OrderedWriter:
    """Writes rows' lines in input order: a line that completes early waits for the ones before.

    `slot` is each row's position among the rows this run writes (0, 1, 2...). Each line is
    flushed and synced when written, so a stopped job loses at most the rows in flight.
    """

    def __init__(self, f: IO[str]):
        self._f = f
        self._pending: dict[int, dict[str, Any]] = {}
        self.next_slot = 0

    def put(self, slot: int, line: dict[str, Any]) -> int:
        """Hold `line` for `slot`, write every line now in order; returns how many were written."""
        self._pending[slot] = line
        written = 0
        while self.next_slot in self._pending:
            self._f.write(json.dumps(self._pending.pop(self.next_slot)) + "\n")
            self.next_slot += 1
            written += 1
        if written:
            self._f.flush()
            os.fsync(self._f.fileno())
        return written
