"""Prompt validation shared by the engine and the router: text, token ids or chat messages.

The router encodes prompts itself (to check their length, send token ids to workers and hash
prefixes), so both ends must accept and refuse exactly the same input with the same errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from baton.errors import ContextLengthError, InvalidRequestError

CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_text(prompt: str) -> None:
    """Refuse an empty text prompt (before any model is loaded, where a caller can)."""
    if not prompt:
        raise InvalidRequestError("prompt is empty; send at least one character")


def encode_prompt(tokenizer, vocab_size: int, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt (text or ids), validated; raises `InvalidRequestError`."""
    if isinstance(prompt, str):
        check_text(prompt)
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise InvalidRequestError("prompt encodes to no tokens")
        return list(ids)
    if not isinstance(prompt, list | tuple) or not prompt:
        raise InvalidRequestError("prompt must be a non-empty string or list of token ids")
    bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token ids must be integers in [0, {vocab_size}); got {bad[:5]}")
    return list(prompt)


def chat_prompt(tokenizer, model_name: str, messages: Sequence[Any]) -> str:
    """The model's chat template applied to `messages`, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(f"model {model_name} has no chat template; send a text prompt")
    if not messages:
        raise InvalidRequestError("messages is empty; send at least one message")
    clean = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {CHAT_ROLES}, "
                                      f"got {role!r}")
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)


def check_context(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """Refuse a request whose prompt plus output cannot fit the model's context."""
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise ContextLengthError(
            f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) is {total}, "
            f"over the model's context of {max_model_len}; shorten the prompt or lower max_tokens"
        )
