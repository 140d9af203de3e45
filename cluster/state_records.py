"""The records `ClusterState` keeps in Redis: workers and their load, journal events, performance.

Each is a pydantic model stored as JSON, so a record written by one Baton version and read by
another fails loudly in one place (`parse`) instead of somewhere downstream.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class WorkerLoad(BaseModel):
    """A worker's load at its last heartbeat: what the router balances on."""

    model_config = ConfigDict(extra="forbid")

    running: int = 0  # requests decoding
    waiting: int = 0  # requests queued for admission
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
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
    """How one finished request went: the method selector's training example."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = ""
    method: str  # acceleration method used, e.g. "none", "ngram", "draft"
    pool: str  # the decode pool that served it
    features: dict[str, float] = Field(default_factory=dict)  # what the selector saw up front
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens_per_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    acceptance_rate: float | None = None  # speculative methods only
    ts: float = Field(default_factory=time.time)
