"""Sampling parameters of one request, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from baton.errors import InvalidRequestError
from baton.speculation import MAX_SPECULATIVE_TOKENS, REQUEST_METHODS

MAX_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    `temperature == 0` means greedy (top-k/top-p are then ignored). `seed` makes a sampled request
    reproducible regardless of what else shares its batch. `stop` strings end generation and are
    not included in the returned text; `stop_token_ids` and EOS end it too (unless `ignore_eos`).
    `logprobs=k` returns the sampled token's log-probability and the k most likely alternatives.
    `method` names the acceleration method (`baton.speculation`); `num_speculative_tokens` caps
    the tokens it drafts per step (None: the engine adapts it to acceptance and load). With
    method `auto` the router's selector picks it: `allow_lossy` lets it pick a pool with
    quantized weights, `disable_exploration` keeps it to its best-believed candidate.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    method: str = "none"
    num_speculative_tokens: int | None = None
    allow_lossy: bool = False
    disable_exploration: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(
                f"max_tokens must be a positive integer, got {self.max_tokens!r}; ask for 1 or more"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}; "
                "use 0 for greedy decoding"
            )
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidRequestError(f"seed must be a non-negative integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative integers")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequestError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )
        if self.method not in REQUEST_METHODS:
            raise InvalidRequestError(
                f"method must be one of {list(REQUEST_METHODS)}, got {self.method!r}"
            )
        k = self.num_speculative_tokens
        if k is not None and (not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS):
            raise InvalidRequestError(
                f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}] "
                f"(or unset to adapt), got {k!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
