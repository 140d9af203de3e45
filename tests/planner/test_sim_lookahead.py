"""The simulator's fast paths against its reference ones: the same requests, the same times."""

from __future__ import annotations

import numpy as np
import pytest

from baton.cluster.planner.catalog import Catalog
from baton.cluster.planner.cost import CostModel
from baton.cluster.planner.model import load_model
from baton.cluster.planner.sim import ClusterSim, ReplicaSpec, SimResult
from baton.cluster.planner.workload import get_workload, poisson


def _load(n: int, rate: float, workload: str, seed: int = 3):
    rng = np.random.default_rng(seed)
    prompts, outputs = get_workload(workload).sample(n, rng)
    return poisson(n, rate, rng), prompts, outputs


def _same(a: SimResult, b: SimResult) -> None:
    np.testing.assert_array_equal(a.ttft, b.ttft)
    np.testing.assert_array_equal(a.tpot, b.tpot)
    assert (a.iterations, a.preemptions, a.remote_prefills, a.duration_s) == \
        (b.iterations, b.preemptions, b.remote_prefills, b.duration_s)
    assert a.busy == b.busy


def _cost(kv_tokens: int | None = None) -> CostModel:
    kv = kv_tokens * 131072 if kv_tokens else None
    return CostModel(Catalog().get("H100"), load_model("llama-3-8b"), 1, kv_memory=kv)


@pytest.mark.parametrize("workload,rate,budget", [
    ("conversation", 8.0, 2048), ("coding", 40.0, 2048), ("conversation", 20.0, 1024)])
def test_work_planned_ahead_gives_the_same_results_as_an_event_for_each_step(
        workload: str, rate: float, budget: int) -> None:
    # Reference: an event per import and per prefill iteration. Fast: imports announced when
    # their prefill ends, a prefill iteration that ends with nothing to follow has no event.
    arrivals, prompts, outputs = _load(800, rate, workload)
    specs = [ReplicaSpec("prefill", _cost(), 1, max_num_batched_tokens=budget),
             ReplicaSpec("decode", _cost(), 2)]
    fast = ClusterSim(specs, 64).run(arrivals, prompts, outputs)
    ref = ClusterSim(specs, 64, lookahead=False).run(arrivals, prompts, outputs)
    _same(fast, ref)
    assert fast.events < ref.events


def test_work_planned_ahead_matches_when_decode_engines_preempt_and_prefill_locally() -> None:
    arrivals, prompts, outputs = _load(300, 20.0, "conversation")
    keep = prompts + outputs <= 6000
    specs = [ReplicaSpec("prefill", _cost(), 1), ReplicaSpec("decode", _cost(6000), 1)]
    a, p, o = arrivals[keep], prompts[keep], outputs[keep]
    fast = ClusterSim(specs, 512).run(a, p, o)
    ref = ClusterSim(specs, 512, lookahead=False).run(a, p, o)
    assert fast.preemptions > 0 and 0 < fast.remote_prefills < len(a)
    _same(fast, ref)
