"""OpenAI request fields to Baton's, and Baton's outputs to OpenAI's response shapes.

Pure functions, no I/O: `router/http.py` serves them. Every field the router cannot honour is
refused with an `InvalidRequestError` that names it, rather than silently ignored: `n` other
than 1, penalties, logit bias, echo, best_of, suffix, tools. Defaults follow OpenAI's
(`temperature` 1, `max_tokens` 16 for completions); `top_k`, `ignore_eos` and `stop_token_ids`
are accepted as extensions, as vLLM does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from baton.errors import BatonError, ContextLengthError, InvalidRequestError, ModelNotFoundError
from baton.outputs import RequestOutput, TokenLogprob
from baton.sampling import SamplingParams

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
               "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
               "DEADLINE_EXCEEDED": 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable",
              504: "timeout_error"}


@dataclass(slots=True)
class ParsedRequest:
    """One OpenAI request in Baton's terms."""

    prompt: Any  # text, token ids or chat messages, as `Router.generate` takes them
    params: SamplingParams
    model: str | None
    stream: bool
    include_usage: bool
    logprobs: bool  # whether the response carries logprobs


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "internal_error"),
                      "param": None, "code": code or str(status)}}


def http_error(exc: BatonError) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI-shaped body of a Baton error (status from its gRPC status)."""
    status = HTTP_STATUS.get(exc.grpc_status, 500)
    if isinstance(exc, ContextLengthError):
        code = "context_length_exceeded"
    elif isinstance(exc, ModelNotFoundError):
        code = "model_not_found"
    else:
        code = exc.grpc_status.lower()
    return status, error_body(status, str(exc.args[0]) if exc.args else type(exc).__name__,
                              code)


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str,
         default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InvalidRequestError(f"{name} must be {what}, got {value!r}")
    return value


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = _get(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise InvalidRequestError(f"n={n} is not supported: Baton returns one choice per "
                                  "request; send n=1 (or several requests)")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), "a number", 0):
            raise InvalidRequestError(f"{name} is not supported; leave it at 0")
    for name in ("logit_bias", "suffix", "tools", "functions"):
        if body.get(name):
            raise InvalidRequestError(f"{name} is not supported; leave it out")
    if body.get("echo"):
        raise InvalidRequestError("echo is not supported; leave it false")
    if _get(body, "best_of", (int,), "an integer", 1) != 1:
        raise InvalidRequestError("best_of is not supported; leave it at 1")


def _sampling(body: dict[str, Any], max_tokens: int | None, top_logprobs: int | None
              ) -> SamplingParams:
    stop = _get(body, "stop", (str, list), "a string or a list of strings", [])
    kw: dict[str, Any] = {
        "temperature": float(_get(body, "temperature", (int, float), "a number", 1.0)),
        "top_p": float(_get(body, "top_p", (int, float), "a number", 1.0)),
        "top_k": _get(body, "top_k", (int,), "an integer", 0),
        "seed": _get(body, "seed", (int,), "an integer"),
        "stop": [stop] if isinstance(stop, str) else stop,
        "stop_token_ids": _get(body, "stop_token_ids", (list,), "a list of token ids", []),
        "ignore_eos": _get(body, "ignore_eos", (bool,), "true or false", False),
        "logprobs": top_logprobs,
    }
    if kw["top_k"] == -1:  # vLLM's spelling of "no top-k"
        kw["top_k"] = 0
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    return SamplingParams(**kw)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    opts = _get(body, "stream_options", (dict,), "an object", {})
    if opts and not stream:
        raise InvalidRequestError("stream_options is only allowed with stream=true")
    return bool(_get(opts, "include_usage", (bool,), "true or false", False))


def parse_completion(body: dict[str, Any]) -> ParsedRequest:
    """A `/v1/completions` body: one prompt (text or token ids)."""
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and any(not isinstance(t, int) or isinstance(t, bool)
                                        for t in prompt):
        raise InvalidRequestError("prompt must be a string or one list of token ids; send one "
                                  "prompt per request")
    if not isinstance(prompt, str | list):
        raise InvalidRequestError("prompt is required: a string or a list of token ids")
    logprobs = _get(body, "logprobs", (int,), "an integer")
    stream = _get(body, "stream", (bool,), "true or false", False)
    params = _sampling(body, _get(body, "max_tokens", (int,), "an integer",
                                  COMPLETION_MAX_TOKENS), logprobs)
    return ParsedRequest(prompt, params, _get(body, "model", (str,), "a string"), stream,
                         _stream_options(body, stream), logprobs is not None)


def _content(i: int, content: Any) -> str:
    """A message's content: a string, or text parts joined (other parts are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"messages[{i}].content: only text parts are "
                                          "supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequestError(f"messages[{i}].content must be a string or a list of text parts")


def parse_chat(body: dict[str, Any]) -> ParsedRequest:
    """A `/v1/chat/completions` body: messages, rendered by the model's chat template later."""
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages is required: a non-empty list of {role, content}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with role and content")
        clean.append({"role": m.get("role"), "content": _content(i, m.get("content"))})
    want_logprobs = _get(body, "logprobs", (bool,), "true or false", False)
    top = _get(body, "top_logprobs", (int,), "an integer")
    if top is not None and not want_logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true")
    max_tokens = _get(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,), "an integer")
    stream = _get(body, "stream", (bool,), "true or false", False)
    params = _sampling(body, max_tokens, (top or 0) if want_logprobs else None)
    return ParsedRequest(clean, params, _get(body, "model", (str,), "a string"), stream,
                         _stream_options(body, stream), want_logprobs)


# -- responses ------------------------------------------------------------------------------------


def usage(last: RequestOutput) -> dict[str, int]:
    prompt, completion = last.metrics.num_prompt_tokens, len(last.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_logprobs(tokenizer: Any, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions logprobs object; `offset` is the text length before these.

    `top_logprobs` is keyed by decoded text, as OpenAI's format has it: alternatives that
    decode alike (a partial UTF-8 sequence) share one key.
    """
    tokens = [tokenizer.decode([lp.token_id]) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{tokenizer.decode([k]): v for k, v in lp.top.items()} for lp in lps],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Any, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(k, v) for k, v in lp.top.items()]}
                        for lp in lps]}


def envelope(kind: str, request_id: str, model: str, choices: list[dict[str, Any]],
             created: int | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": created or int(time.time()),
            "model": model, "choices": choices}
