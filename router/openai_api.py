"""OpenAI request bodies to Baton's requests, and Baton's outputs to OpenAI's response shapes.

Pure functions, no I/O: `router/http.py` serves them. A body is checked by its model in
`openai_protocol`; every problem (a wrong type, a field the router cannot honour) becomes one
`InvalidRequestError` that names the field, also as the OpenAI error's `param`. Defaults follow
OpenAI's (`temperature` 1, `max_tokens` 16 for completions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from baton.errors import BatonError, ContextLengthError, InvalidRequestError, ModelNotFoundError
from baton.outputs import RequestOutput, TokenLogprob
from baton.router.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from baton.sampling import SamplingParams
from baton.validation import problems

Request = TypeVar("Request", bound=OpenAIRequest)

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


def error_body(status: int, message: str, code: str | None = None, param: str | None = None
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "internal_error"),
                      "param": param, "code": code or str(status)}}


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
                              code, exc.param if isinstance(exc, InvalidRequestError) else None)


def parse_completion(body: dict[str, Any]) -> ParsedRequest:
    """A `/v1/completions` body: one prompt (text or token ids)."""
    req = _validate(CompletionRequest, body)
    params = _sampling(req, req.max_tokens, req.logprobs)
    return ParsedRequest(req.prompt, params, req.model, req.stream, req.include_usage,
                         req.logprobs is not None)


def parse_chat(body: dict[str, Any]) -> ParsedRequest:
    """A `/v1/chat/completions` body: messages, rendered by the model's chat template later."""
    req = _validate(ChatCompletionRequest, body)
    max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = req.max_tokens
    params = _sampling(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    return ParsedRequest(messages, params, req.model, req.stream, req.include_usage,
                         req.logprobs)


def _validate(model: type[Request], body: dict[str, Any]) -> Request:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        found = problems(exc)
        raise InvalidRequestError("; ".join(p.message for p in found),
                                  param=found[0].field or None) from exc


def _sampling(req: OpenAIRequest, max_tokens: int | None, logprobs: int | None
              ) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=0 if req.top_k == -1 else req.top_k,
        seed=req.seed, stop=req.stop_strings, stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, logprobs=logprobs, method=req.method,
        num_speculative_tokens=req.num_speculative_tokens, allow_lossy=req.allow_lossy,
        disable_exploration=req.disable_exploration,
        **({} if max_tokens is None else {"max_tokens": max_tokens}))


# -- responses ------------------------------------------------------------------------------------


def usage(last: RequestOutput) -> dict[str, Any]:
    """OpenAI's usage object, extended with how speculative decoding served the request."""
    m = last.metrics
    prompt, completion = m.num_prompt_tokens, len(last.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "spec_decode": {"method": m.method, "num_drafts": m.spec_num_drafts,
                            "num_draft_tokens": m.spec_draft_tokens,
                            "num_accepted_tokens": m.spec_accepted_tokens,
                            "acceptance_rate": m.acceptance_rate,
                            "mean_accepted_length": m.mean_accepted_length,
                            "num_forward_passes": m.num_forward_passes}}


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
