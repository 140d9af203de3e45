"""OpenAI request bodies as pydantic models (the shapes of `/v1/completions` and
`/v1/chat/completions`), checked the way OpenAI's API checks them.

Types are strict, as OpenAI's are (a string is not a number, `true` is not 1); a null is the
field's default; fields Baton does not know are ignored. Fields Baton cannot honour are refused by
name unless they hold the value that changes nothing: `n` other than 1, penalties, logit bias,
echo, best_of, suffix, tools. `top_k`, `ignore_eos` and `stop_token_ids` are extensions, as in
vLLM; `method` and `num_speculative_tokens` choose Baton's acceleration method. Value ranges
(temperature >= 0, ...) are `SamplingParams`'s to check.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from baton.validation import must_be, one_of, unsupported

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Fields Baton cannot honour: the one value accepted (None: anything empty), and what to do.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (1, "Baton returns one choice per request: send n=1 (or several requests)"),
    "best_of": (1, "leave it at 1"),
    "presence_penalty": (0, "leave it at 0"),
    "frequency_penalty": (0, "leave it at 0"),
    "echo": (False, "leave it false"),
    "logit_bias": (None, "leave it out"),
    "suffix": (None, "leave it out"),
    "tools": (None, "leave it out"),
    "functions": (None, "leave it out"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    """One message; text parts of its content are joined into one string."""

    role: str
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_joined(cls, content: Any) -> Any:
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise must_be("a string or a list of text parts")
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text parts are supported, got a part of type {kind!r}")
        return "".join(part["text"] for part in content)


class OpenAIRequest(_Strict):
    """What both endpoints share: the model, streaming, sampling, and the refused fields."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # -1 (vLLM's spelling) also means no top-k
    seed: int | None = None
    stop: Annotated[str | list[str], one_of("a string or a list of strings")] = Field(
        default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    method: str = "auto"  # Baton's acceleration method (OpenAI clients: extra_body)
    num_speculative_tokens: int | None = None
    allow_lossy: bool = False  # with method auto: quantized pools may serve it
    disable_exploration: bool = False  # with method auto: never an exploratory choice
    n: int = 1
    best_of: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    echo: bool = False
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, body: Any) -> Any:
        return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _honourable(cls, value: Any, info: ValidationInfo) -> Any:
        accepted, advice = UNSUPPORTED[str(info.field_name)]
        if (value != accepted) if accepted is not None else bool(value):
            raise unsupported(advice)
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions, info: ValidationInfo) -> StreamOptions:
        if not info.data.get("stream"):
            raise ValueError("only allowed with stream=true")
        return options

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class CompletionRequest(OpenAIRequest):
    """A `/v1/completions` body: one prompt, text or token ids (a batch of one is unwrapped)."""

    prompt: Annotated[str | list[int] | list[str] | list[list[int]],
                      one_of("a string or a list of token ids")]
    max_tokens: int = COMPLETION_MAX_TOKENS
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise must_be("a string or one list of token ids; send one prompt per request")
            return prompt[0]
        return prompt


class ChatCompletionRequest(OpenAIRequest):
    """A `/v1/chat/completions` body: messages, rendered by the model's chat template later."""

    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # the older name of max_completion_tokens

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:  # an empty conversation is no conversation
            raise PydanticCustomError("missing", "Field required")
        return messages

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs=true")
        return top
