"""The cluster's YAML config, parsed into pydantic models with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from baton.engine_config import Dtype, EngineConfig
from baton.errors import ConfigError
from baton.validation import problems, read_yaml

# Set on the pool itself (placement needs them), never among its engine options.
POOL_LEVEL = ("model", "dtype", "device")


class PoolConfig(BaseModel):
    """One pool of identical workers: its role and where its replicas may run."""

    model_config = ConfigDict(extra="forbid")

    name: str
    role: Literal["prefill", "decode", "both"]
    replicas: int = Field(1, ge=0)
    model: str | None = None  # defaults to the cluster's model
    dtype: Dtype = "auto"  # this machine's fastest (baton.actors.dtype_choice)
    device: Literal["cpu", "cuda"] = "cpu"
    accelerator_type: str | None = None  # Ray's `accelerator_type:<T>` resource
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, gt=0)  # also the engine's thread count on CPU
    # Cores to pin this pool's replicas to, num_cpus each in order (one machine, CPU pools).
    cpu_cores: list[int] | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig)  # further engine options

    @model_validator(mode="after")
    def _pool_fields_on_the_pool(self) -> PoolConfig:
        for name in POOL_LEVEL:
            if name in self.engine.model_fields_set:
                raise ValueError(f"pool {self.name!r}: set {name} on the pool, not among its "
                                 "engine options")
        return self

    @model_validator(mode="after")
    def _gpu_matches_device(self) -> PoolConfig:
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError(f"pool {self.name!r}: device cuda needs num_gpus > 0")
        if self.cpu_cores is not None:
            need = int(self.num_cpus) * self.replicas
            if int(self.num_cpus) != self.num_cpus or len(self.cpu_cores) != need:
                raise ValueError(f"pool {self.name!r}: cpu_cores needs {need} cores "
                                 f"(num_cpus x replicas, whole cores), got {len(self.cpu_cores)}")
        return self


class RedisConfig(BaseModel):
    """Where the cluster's shared state lives: an external Redis, or a local redis-server."""

    model_config = ConfigDict(extra="forbid")

    # An external Redis, password in the URL (redis://:PASSWORD@HOST:PORT/DB); None: `baton up`
    # starts a local redis-server with a generated password.
    url: str | None = None
    data_dir: str | None = None  # the local server's data; None: ~/.baton/<cluster name>/redis
    port: int = Field(0, ge=0, le=65535)  # the local server's port; 0 picks a free one
    heartbeat_ttl_s: float = Field(10.0, gt=0)  # a worker silent this long drops out
    journal_maxlen: int = Field(100_000, gt=0)  # request journal events kept (about)
    history_maxlen: int = Field(100_000, gt=0)  # performance records kept (about)

    def data_path(self, cluster: str) -> Path:
        """The local server's data dir, for the cluster of that name."""
        return Path(self.data_dir or f"~/.baton/{cluster}/redis").expanduser()


class SelectorConfig(BaseModel):
    """How the router's method selector explores and retrains (see `baton.router.selection`)."""

    model_config = ConfigDict(extra="forbid")

    explore_rate: float = Field(0.05, ge=0, le=1)  # most share of `auto` requests that explore
    train_in_background: bool = True
    train_min_new: int = Field(200, ge=1)  # new history records that start a retraining
    train_interval_s: float = Field(300.0, gt=0)  # at most one background training per this
    poll_s: float = Field(10.0, gt=0)  # how often routers look for a newer model


class ClusterConfig(BaseModel):
    """A whole cluster: the model, its pools, and how requests are split between them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")  # namespaces its Redis keys
    model: str = "default"
    pools: list[PoolConfig] = Field(default_factory=lambda: [
        PoolConfig(name="prefill", role="prefill"), PoolConfig(name="decode", role="decode"),
    ])
    prefill_threshold: int = Field(64, ge=0)  # uncached prompt tokens worth a remote prefill
    kv_timeout_s: float = Field(30.0, gt=0)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    selector: SelectorConfig = Field(default_factory=SelectorConfig)

    @model_validator(mode="after")
    def _pools_make_sense(self) -> ClusterConfig:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        pinned = [c for p in self.pools for c in p.cpu_cores or []]
        if len(set(pinned)) != len(pinned):
            raise ValueError(f"cpu_cores overlap between pools: {sorted(pinned)}")
        roles = {p.role for p in self.pools if p.replicas}
        if not roles & {"decode", "both"}:
            raise ValueError("at least one pool with replicas must have role decode or both")
        return self


def load_config(source: str | Path | dict[str, Any] | None) -> ClusterConfig:
    """Parse a YAML file (or an already-loaded dict); None gives the default local cluster."""
    if source is None:
        return ClusterConfig()
    raw = source if isinstance(source, dict) else read_yaml(source, "cluster config")
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as exc:
        said = "; ".join(p.message for p in problems(exc))
        raise ConfigError(f"invalid cluster config: {said}") from exc
