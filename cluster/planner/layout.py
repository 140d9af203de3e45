"""A pool layout the planner considers, and the cluster config (deployment values) it becomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from baton.cluster.config import ClusterConfig, PoolConfig
from baton.cluster.planner.cost import CostModel
from baton.cluster.planner.sim import ReplicaSpec


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """`replicas` engines of one role, each on `cost.tp` devices of one type."""

    role: str  # prefill | decode | both
    cost: CostModel
    replicas: int
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    num_cpus: float = 1  # a CPU worker's cores (its engine's threads)

    @property
    def device(self) -> str:
        return self.cost.device.name

    @property
    def price_per_hour(self) -> float:
        return self.cost.price_per_hour * self.replicas

    def label(self) -> str:
        short = {"prefill": "P", "decode": "D", "both": "PD"}[self.role]
        return f"{short} {self.replicas}x({self.cost.tp}x{self.device})"

    def replica_spec(self) -> ReplicaSpec:
        return ReplicaSpec(self.role, self.cost, self.replicas, self.max_num_batched_tokens,
                           self.max_num_seqs)


@dataclass(frozen=True, slots=True)
class Layout:
    """Pools plus the prefill threshold (uncached prompt tokens worth a remote prefill)."""

    pools: tuple[PoolPlan, ...]
    prefill_threshold: int = 64

    @property
    def kind(self) -> str:
        return "disaggregated" if any(p.role == "prefill" for p in self.pools) else "colocated"

    @property
    def price_per_hour(self) -> float:
        return sum(p.price_per_hour for p in self.pools)

    @property
    def num_devices(self) -> int:
        return sum(p.cost.tp * p.replicas for p in self.pools)

    def label(self) -> str:
        pools = " + ".join(p.label() for p in self.pools)
        return f"{pools} thr {self.prefill_threshold}" if self.kind == "disaggregated" else pools

    def replica_specs(self) -> list[ReplicaSpec]:
        return [p.replica_spec() for p in self.pools]

    def scaled(self, k: int) -> Layout:
        """The same layout with every pool's replicas multiplied by `k`."""
        return Layout(tuple(PoolPlan(p.role, p.cost, p.replicas * k, p.max_num_batched_tokens,
                                     p.max_num_seqs, p.num_cpus) for p in self.pools),
                      self.prefill_threshold)

    def cluster_config(self, model: str, name: str = "planned") -> ClusterConfig:
        """The cluster config (`baton up -c`, the Helm chart's `cluster:`) of this layout."""
        pools = []
        for p in self.pools:
            engine = {"max_num_batched_tokens": p.max_num_batched_tokens,
                      "max_num_seqs": p.max_num_seqs}
            pool_name = f"{p.role}-{p.device.lower()}"
            if p.cost.device.kind == "cpu":
                pools.append(PoolConfig(name=pool_name, role=p.role, replicas=p.replicas,
                                        num_cpus=p.num_cpus, engine=engine))
            else:
                pools.append(PoolConfig(name=pool_name, role=p.role, replicas=p.replicas,
                                        accelerator_type=p.device, num_gpus=p.cost.tp,
                                        device="cuda", num_cpus=4 * p.cost.tp, engine=engine))
        return ClusterConfig(name=name, model=model, pools=pools,
                             prefill_threshold=self.prefill_threshold)

    def values(self, model: str, name: str = "planned") -> dict[str, Any]:
        """Deployment values: `{cluster: <cluster config>}`, only the fields the plan sets."""
        cfg = self.cluster_config(model, name)
        return {"cluster": cfg.model_dump(mode="json", exclude_unset=True)}
