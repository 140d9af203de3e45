"""Pydantic's validation failures said Baton's way: the field's path, what it must be, what came.

Config files (`cluster.yaml`, a pool's engine options) and request bodies (the OpenAI API) are
parsed into pydantic models; `problems` turns a `ValidationError` into sentences that name the
field (`pools[0].engine.block_size must be >= 1, got 0`), and the validators here raise the two
kinds of error those sentences know beyond pydantic's own: `must_be` and `unsupported`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, WrapValidator
from pydantic_core import ErrorDetails, PydanticCustomError

from baton.errors import ConfigError

# What a value of the wrong type should have been, by pydantic's error type.
TYPE_WORDS = {
    "string_type": "a string", "int_type": "an integer", "int_parsing": "an integer",
    "int_from_float": "an integer", "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false", "list_type": "a list",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}
# A number out of range: the comparison, and the key of its limit in the error's context.
BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
          "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
REPR_LIMIT = 60


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content (an empty file: {}); a missing or malformed file is a ConfigError
    that calls it `what` ("cluster config", "catalog file")."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Problem:
    """One failed field: its path (`messages[0].content`; empty for the whole object), the kind
    of failure (pydantic's error type, or `must_be`, `unsupported`) and a sentence naming it."""

    field: str
    kind: str
    message: str


def must_be(what: str) -> PydanticCustomError:
    """The error a validator raises for a value outside what the field takes."""
    return PydanticCustomError("must_be", "must be {what}", {"what": what})


def unsupported(advice: str) -> PydanticCustomError:
    """The error a validator raises for a valid value Baton cannot honour."""
    return PydanticCustomError("unsupported", "not supported; {advice}", {"advice": advice})


def one_of(what: str) -> WrapValidator:
    """For a union type: one `must_be(what)` instead of one failure per member type."""

    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise must_be(what) from None

    return WrapValidator(check)


def problems(exc: ValidationError) -> list[Problem]:
    """Each failure of `exc` as a `Problem`, in pydantic's order."""
    return [Problem(path(err["loc"]), err["type"], _sentence(err)) for err in exc.errors()]


def path(loc: tuple[int | str, ...]) -> str:
    """`("pools", 0, "engine")` as `pools[0].engine`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _sentence(err: ErrorDetails) -> str:
    where, kind, ctx = path(err["loc"]), err["type"], err.get("ctx") or {}
    got = _short(err.get("input"))
    if kind == "missing":
        return f"{where} is required"
    if kind == "extra_forbidden":
        return f"{where} is not a known field"
    if kind == "unsupported":
        return f"{where}={got} is not supported; {ctx['advice']}"
    if kind == "must_be":
        what = ctx["what"]
    elif kind in TYPE_WORDS:
        what = TYPE_WORDS[kind]
    elif kind == "literal_error":
        what = ctx["expected"]
    elif kind in BOUNDS:
        op, key = BOUNDS[kind]
        what = f"{op} {ctx[key]}"
    else:  # value errors raised by validators, and pydantic's other checks
        message = str(ctx["error"]) if kind == "value_error" else err["msg"]
        return f"{where}: {message}" if where else message
    return f"{where or 'the value'} must be {what}, got {got}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."
