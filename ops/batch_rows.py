"""Rows of a batch input file: parsed into Baton requests, or into an error that says what to fix.

Two row shapes are accepted, line by line in one file:

- OpenAI's batch shape: `{"custom_id", "method": "POST", "url": "/v1/chat/completions" or
  "/v1/completions", "body": {...}}`. The body is checked exactly as the router's HTTP API checks
  it (OpenAI's defaults: `temperature` 1, `max_tokens` 16 for completions; fields Baton does not
  know are ignored, as OpenAI clients send extras).
- Baton's flat shape: `{"custom_id"?, "prompt" or "messages", "max_tokens", "temperature", ...}`
  with any field of those bodies. Baton's defaults apply (`temperature` 0, `max_tokens` 128, as
  `baton generate`), and a field Baton does not know is refused, since a typo would otherwise
  pass silently.

A row without `custom_id` is called `row-<index>` (its 0-based line index in the file); so is a row
that cannot be read, and a row whose custom_id was used by an earlier line (its result would
otherwise be mistaken for the first one's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from baton.errors import InvalidRequestError
from baton.router.openai_api import ParsedRequest, parse_chat, parse_completion
from baton.router.openai_protocol import ChatCompletionRequest, CompletionRequest
from baton.sampling import SamplingParams

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
OPENAI_ROW_FIELDS = frozenset({"custom_id", "method", "url", "body"})
BATON_ROW_FIELDS = (frozenset(CompletionRequest.model_fields) | frozenset(
    ChatCompletionRequest.model_fields) | {"custom_id"})
BATON_DEFAULTS = {"temperature": 0.0, "max_tokens": SamplingParams().max_tokens}


@dataclass(slots=True)
class BatchRow:
    """One readable row: which endpoint it asks for, and the request in Baton's terms."""

    index: int
    custom_id: str
    url: str  # CHAT_URL or COMPLETIONS_URL: shapes the response body
    request: ParsedRequest


@dataclass(slots=True)
class BadRow:
    """A row that cannot run: the message says what to change in the input line."""

    index: int
    custom_id: str
    message: str
    param: str | None = None


def default_id(index: int) -> str:
    return f"row-{index}"


def parse_line(index: int, line: str) -> BatchRow | BadRow:
    """One input line (not blank) as a row to run, or the reason it cannot run."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRow(index, default_id(index),
                      f"line {index + 1} is not JSON ({exc.msg} at column {exc.colno}); write one "
                      "JSON object per line")
    if not isinstance(data, dict):
        return BadRow(index, default_id(index),
                      f"line {index + 1} is a JSON {type(data).__name__}, not an object; write "
                      "one object per line")
    custom_id = data.get("custom_id", default_id(index))
    if not isinstance(custom_id, str) or not custom_id:
        return BadRow(index, default_id(index),
                      f"custom_id must be a non-empty string, got {custom_id!r}", "custom_id")
    try:
        url, request = _openai_row(data) if "body" in data or "url" in data else _baton_row(data)
    except InvalidRequestError as exc:
        return BadRow(index, custom_id, exc.message, exc.param)
    return BatchRow(index, custom_id, url, request)


def _openai_row(data: dict[str, Any]) -> tuple[str, ParsedRequest]:
    _refuse_unknown(data, OPENAI_ROW_FIELDS, "OpenAI batch rows have custom_id, method, url, body")
    method = data.get("method", "POST")
    if method != "POST":
        raise InvalidRequestError(f"method must be POST, got {method!r}", "method")
    url = data.get("url")
    body = data.get("body")
    if not isinstance(body, dict):
        raise InvalidRequestError("body must be an object: the request's JSON body", "body")
    if url == CHAT_URL:
        return url, _checked(parse_chat(body))
    if url == COMPLETIONS_URL:
        return url, _checked(parse_completion(body))
    raise InvalidRequestError(f"url must be {CHAT_URL} or {COMPLETIONS_URL}, got {url!r}", "url")


def _baton_row(data: dict[str, Any]) -> tuple[str, ParsedRequest]:
    _refuse_unknown(data, BATON_ROW_FIELDS,
                    "Baton rows take prompt or messages and the sampling fields of "
                    "/v1/completions")
    body = {**BATON_DEFAULTS, **{k: v for k, v in data.items() if k != "custom_id"}}
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if has_prompt == has_messages:
        raise InvalidRequestError("give exactly one of prompt (text) or messages (chat)",
                                  "prompt")
    if has_messages:
        return CHAT_URL, _checked(parse_chat(body))
    return COMPLETIONS_URL, _checked(parse_completion(body))


def _refuse_unknown(data: dict[str, Any], known: frozenset[str], advice: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidRequestError(f"unknown field {unknown[0]!r}; {advice}", unknown[0])


def _checked(request: ParsedRequest) -> ParsedRequest:
    # A batch writes each result whole, once: streaming and logprobs have nowhere to go yet.
    if request.stream:
        raise InvalidRequestError("stream must be false in a batch row: results are written "
                                  "whole; leave it out", "stream")
    if request.logprobs:
        raise InvalidRequestError("logprobs are not returned by batch jobs yet; leave them out",
                                  "logprobs")
    return request


def parse_rows(lines: list[str]) -> list[BatchRow | BadRow]:
    """Every non-blank line, parsed; a custom_id seen before makes its later rows bad."""
    rows: list[BatchRow | BadRow] = []
    first_seen: dict[str, int] = {}
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        row = parse_line(index, line)
        earlier = first_seen.setdefault(row.custom_id, index)
        if earlier != index:
            row = BadRow(index, default_id(index),
                         f"custom_id {row.custom_id!r} is already used on line {earlier + 1}; "
                         "give each row its own custom_id", "custom_id")
            first_seen.setdefault(row.custom_id, index)
        rows.append(row)
    return rows
