"""One request's state inside the engine: tokens, KV bookkeeping, status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from baton.actors.draft_tree import DraftTree
from baton.outputs import RequestMetrics, TokenLogprob
from baton.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """A request as the scheduler and block manager see it.

    `num_computed_tokens` counts tokens whose KV is in the cache; the tokens after it are what the
    next step has to run. `block_table` is owned by the `BlockManager`: nothing else edits it.
    While a speculative `draft` is attached, its tokens are the last `len(draft)` of `token_ids`
    (unverified: the step verifies them, then `drop_draft` removes them again).
    `draft_kv_len` counts the positions a separate draft model holds KV for.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    metrics: RequestMetrics = field(init=False)
    draft: DraftTree | None = None
    draft_kv_len: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.metrics = RequestMetrics(
            arrival=time.monotonic(), num_prompt_tokens=len(self.prompt_token_ids)
        )
        if self.params.logprobs is not None:
            self.logprobs = []

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft) if self.draft is not None else 0

    def attach_draft(self, draft: DraftTree) -> None:
        self.token_ids.extend(draft.tokens)
        self.draft = draft

    def drop_draft(self) -> None:
        """Remove the unverified draft tokens; KV computed for them no longer counts."""
        if self.draft is None:
            return
        del self.token_ids[len(self.token_ids) - len(self.draft) :]
        self.draft = None
        self.num_computed_tokens = min(self.num_computed_tokens, len(self.token_ids) - 1)
        self.draft_kv_len = min(self.draft_kv_len, len(self.token_ids))

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
