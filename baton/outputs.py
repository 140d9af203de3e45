"""What the engine hands back per request and step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from baton.stats import tpot

# Where a request's prompt was computed: on its decode worker, or on a prefill worker that pushed
# the KV over.
PrefillPath = Literal["local", "disaggregated"]


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of the chosen token and the most likely alternatives at that position."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class ExpertCacheUse:
    """Expert-cache counter changes over some engine steps (MoE offload only).

    `hits` + `misses` are expert uses by the steps' MoE layers; `bytes_loaded` counts the copies
    into the device cache (misses and prefetches); `stall_seconds` is forward time spent waiting
    for experts to load.
    """

    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    stall_seconds: float = 0.0

    def __sub__(self, earlier: ExpertCacheUse) -> ExpertCacheUse:
        return ExpertCacheUse(self.hits - earlier.hits, self.misses - earlier.misses,
                              self.bytes_loaded - earlier.bytes_loaded,
                              self.stall_seconds - earlier.stall_seconds)

    def __add__(self, other: ExpertCacheUse) -> ExpertCacheUse:
        return ExpertCacheUse(self.hits + other.hits, self.misses + other.misses,
                              self.bytes_loaded + other.bytes_loaded,
                              self.stall_seconds + other.stall_seconds)


@dataclass(slots=True)
class StepStats:
    """One engine step that ran the model: its batch, its time, and its expert-cache use.

    `seconds` times the forward pass; `expert_cache` (None without MoE offload) covers the
    whole step up to the end of its forward, drafting included (see `RequestMetrics`).
    """

    num_seqs: int
    num_tokens: int
    seconds: float
    expert_cache: ExpertCacheUse | None = None


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps (time.monotonic seconds) and counts for one request."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    prefill_path: PrefillPath = "local"
    kv_bytes_received: int = 0
    # Speculative decoding (vLLM's spec_decode counters, per request).
    method: str = "none"
    num_forward_passes: int = 0  # target-model steps that produced output tokens
    spec_num_drafts: int = 0  # steps that verified a draft
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    # MoE offload (None on a model without it): the sum, over every step of this engine that
    # ran the request's tokens, of that step's expert-cache counter changes (`StepStats`). A step
    # serves its whole batch at once, so each request in it is charged the step's full figures:
    # they say what the request waited through, and requests sharing steps overlap. On a decode
    # worker fed by a prefill worker, the prompt's steps ran there and are not included.
    expert_cache: ExpertCacheUse | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted share of drafted tokens (None: nothing was drafted)."""
        if not self.spec_draft_tokens:
            return None
        return self.spec_accepted_tokens / self.spec_draft_tokens

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per verifying step (accepted drafts plus the one the target adds)."""
        if not self.spec_num_drafts:
            return None
        return 1 + self.spec_accepted_tokens / self.spec_num_drafts

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def tpot(self, num_output_tokens: int) -> float | None:
        """Mean seconds per output token after the first."""
        return tpot(self.first_token, self.finished, num_output_tokens)


@dataclass(slots=True)
class RequestOutput:
    """One step's news for one request.

    `delta_text` / `delta_token_ids` are what is new since the last output for this request (for
    streaming); `text` / `token_ids` are everything generated so far. `finish_reason` is `stop`
    (EOS, stop token or stop string), `length` (max_tokens), `abort` or `error` once finished.
    """

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


def merge_outputs(outputs: Sequence[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: the deltas joined in order, everything else
    (text, token ids, finish, metrics) from the last. One output is returned as it is."""
    if len(outputs) == 1:
        return outputs[0]
    return replace(outputs[-1], delta_text="".join(o.delta_text for o in outputs),
                   delta_token_ids=[t for o in outputs for t in o.delta_token_ids])
