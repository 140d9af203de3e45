"""The records the cluster's shared state keeps: workers and their load, journal events,
performance; and what a router needs of that state (`RouterState`).

The router writes them and the cluster (`baton.cluster.state.ClusterState`, over Redis) stores
them, so they live here, below both. Each is a pydantic model stored as JSON, so a record written
by one Baton version and read by another fails loudly in one place (`parse`) instead of somewhere
downstream.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from baton.outputs import ExpertCacheUse, PrefillPath

JournalKind = Literal["accepted", "finished", "failed"]


class WorkerInfo(BaseModel):
    """What a worker is and where to reach it; written once by `register`."""

    model_config = ConfigDict(extra="forbid")

    worker_id: str
    role: Literal["prefill", "decode", "both"]
    pool: str
    node: str = ""  # Ray node id or host name
    address: str = ""  # the worker's KV link (gRPC) address, host:port
    model: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


class ExpertCacheStatus(BaseModel):
    """A worker's MoE expert cache since the worker started (MoE offload only)."""

    model_config = ConfigDict(extra="forbid")

    hits: int = 0  # expert uses served by resident experts
    misses: int = 0  # expert uses that loaded the expert first
    hit_rate: float = 0.0
    bytes_loaded: int = 0  # expert bytes copied into the device cache
    stall_seconds: float = 0.0  # forward time spent waiting for experts

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ExpertCacheStatus | None:
        """The figures in a worker's `info()`; None for a worker without offloaded experts."""
        cache = info.get("expert_cache")
        if not cache:
            return None
        return cls.model_validate({k: cache[k] for k in cls.model_fields if k in cache})


class WorkerLoad(BaseModel):
    """A worker's load at its last heartbeat: what the router balances on."""

    model_config = ConfigDict(extra="forbid")

    running: int = 0  # requests decoding
    waiting: int = 0  # requests queued for admission
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    expert_cache: ExpertCacheStatus | None = None  # None: a dense model, or no offload
    extra: dict[str, Any] = Field(default_factory=dict)


class WorkerStatus(BaseModel):
    """One live worker as the registry shows it: `load` is None until its first heartbeat."""

    info: WorkerInfo
    load: WorkerLoad | None = None
    last_seen: float  # unix time of the last register or heartbeat


class JournalEvent(BaseModel):
    """One step of a request's life in the journal: accepted, then finished or failed."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    event: JournalKind
    ts: float = Field(default_factory=time.time)
    reason: str = ""  # why it failed; empty otherwise
    detail: dict[str, Any] = Field(default_factory=dict)  # pool, workers, method, tokens, ...


class PerfRecord(BaseModel):
    """How one finished request went: the method selector's training example.

    The candidate is (`method`, `k`, `pool`, `quantization`); `features` holds what the selector
    saw up front (`baton.router.features`, and the pool's load); `selected_by` says whether the
    selector chose the candidate ("selector", `explored` when it was an exploration) or the
    request named it ("request").
    """

    model_config = ConfigDict(extra="forbid")

    request_id: str = ""
    method: str  # acceleration method used, e.g. "none", "ngram", "draft"
    prefill_path: PrefillPath  # where its prompt was computed
    features: dict[str, float] = Field(default_factory=dict)  # what the selector saw up front
    model: str = ""  # the served model
    pool: str = ""
    k: int | None = None  # draft tokens per step when fixed; None: adaptive
    quantization: str | None = None  # the pool's weight format (None: full precision)
    selected_by: Literal["selector", "request"] = "request"
    explored: bool = False
    predicted_tokens_per_s: float | None = None  # the selector's belief for its pick
    selector_version: int = 0  # the selector model behind the pick (0: none)
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens_per_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    acceptance_rate: float | None = None  # speculative methods only
    mean_accepted_length: float | None = None  # tokens per verifying step
    forward_passes_per_token: float | None = None  # target steps per output token
    # MoE offload only: the expert-cache use of the steps the request ran in on its decode
    # worker (`RequestMetrics.expert_cache` says exactly what is counted); None on a dense model.
    expert_cache: ExpertCacheUse | None = None
    ts: float = Field(default_factory=time.time)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Output tokens per second after the first: what the selector predicts."""
        return 1.0 / self.tpot_s if self.tpot_s else None


class RouterState(Protocol):
    """What a router writes to the cluster's shared state (`ClusterState` is the one in use).

    Writes never raise and never block on the store; `available` is False during an outage.
    """

    @property
    def available(self) -> bool: ...

    def accepted(self, request_id: str, **detail: Any) -> None: ...

    def finished(self, request_id: str, **detail: Any) -> None: ...

    def failed(self, request_id: str, reason: str, **detail: Any) -> None: ...

    def record(self, rec: PerfRecord) -> None: ...

    def update_router_stats(self, router_id: str, counters: Mapping[str, int] | None = None,
                            gauges: Mapping[str, float] | None = None) -> None: ...

    def close(self, timeout_s: float = 5.0) -> None: ...
