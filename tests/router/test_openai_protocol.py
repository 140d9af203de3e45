"""OpenAI request bodies checked by their models: strict types, nulls as defaults, unknown fields
ignored, every problem named by its field (pure functions, no server)."""

from __future__ import annotations

import pytest

from baton.errors import InvalidRequestError
from baton.router.openai_api import parse_chat, parse_completion

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("parse", "body", "field", "says"), [
    (parse_completion, {"prompt": [1, True]}, "prompt",
     "prompt must be a string or a list of token ids, got [1, True]"),
    (parse_completion, {"prompt": "a", "max_tokens": 2.0}, "max_tokens",
     "max_tokens must be an integer, got 2.0"),
    (parse_completion, {"prompt": "a", "top_p": "1"}, "top_p", "top_p must be a number"),
    (parse_completion, {"prompt": "a", "stop": ["x", 3]}, "stop",
     "stop must be a string or a list of strings"),
    (parse_completion, {"prompt": "a", "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage", "stream_options.include_usage must be true or false"),
    (parse_chat, {**CHAT, "logprobs": "yes"}, "logprobs", "logprobs must be true or false"),
    (parse_chat, {"messages": [{"content": "hi"}]}, "messages[0].role",
     "messages[0].role is required"),
    (parse_chat, {"messages": "hi"}, "messages", "messages must be a list, got 'hi'"),
    (parse_chat, {**CHAT, "tools": [{"type": "function"}]}, "tools",
     "tools=[{'type': 'function'}] is not supported; leave it out"),
])
def test_a_wrong_body_is_refused_naming_the_field(parse, body, field, says):
    with pytest.raises(InvalidRequestError) as info:
        parse(body)
    assert info.value.param == field
    assert says in info.value.message


def test_every_problem_is_said_at_once():
    with pytest.raises(InvalidRequestError) as info:
        parse_completion({"prompt": "a", "seed": "3", "top_k": 1.5})
    assert "top_k must be an integer" in info.value.message
    assert "seed must be an integer" in info.value.message


def test_nulls_mean_the_default_and_unknown_fields_are_ignored():
    req = parse_completion({"prompt": "a", "temperature": None, "n": None, "stop": None,
                            "max_tokens": None, "logit_bias": {}, "user": "someone"})
    assert (req.params.temperature, req.params.max_tokens, req.params.stop) == (1.0, 16, [])
    chat = parse_chat({**CHAT, "max_tokens": 7, "max_completion_tokens": None, "metadata": {}})
    assert chat.params.max_tokens == 7
