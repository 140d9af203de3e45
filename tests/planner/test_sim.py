"""The cluster simulator's accounting: one request alone, event skipping, disaggregation, KV."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from baton.cluster.planner.catalog import Catalog
from baton.cluster.planner.cost import CostModel
from baton.cluster.planner.model import load_model
from baton.cluster.planner.sim import ClusterSim, ReplicaSpec, Speculation
from baton.cluster.planner.workload import get_workload, poisson
from baton.errors import ConfigError


@pytest.fixture(scope="module")
def h100() -> CostModel:
    return CostModel(Catalog().get("H100"), load_model("llama-3-8b"), 1)


def test_a_request_alone_takes_its_prefill_then_one_step_per_token(h100: CostModel) -> None:
    sim = ClusterSim([ReplicaSpec("both", h100, 1, max_num_batched_tokens=4096)], 64)
    res = sim.run(np.array([0.0]), np.array([1000]), np.array([11]))
    prefill = h100.iteration(1000, 1000 * 500, 0, 0.0)
    steps = [h100.iteration(0, 0.0, 1, 1000 + i) for i in range(10)]
    assert res.ttft[0] == pytest.approx(prefill)
    assert res.tpot[0] == pytest.approx(sum(steps) / 10, rel=1e-6)


def test_the_request_path_delays_every_first_token_and_nothing_else(h100: CostModel) -> None:
    """A decode pool's `request_s` (API, router, actor calls) adds exactly that to every TTFT;
    the engines see the same gaps between arrivals, so TPOT and the routing do not change."""
    arrivals = poisson(40, 8.0, np.random.default_rng(1))
    prompts, outputs = np.full(40, 600), np.full(40, 50)
    plain, slow = (CostModel(h100.device, h100.model, 1,
                             dataclasses.replace(h100.eff, request_s=s)) for s in (0.0, 0.04))
    runs = [ClusterSim([ReplicaSpec("prefill", c, 1), ReplicaSpec("decode", c, 2)], 256).run(
        arrivals, prompts, outputs) for c in (plain, slow)]
    assert runs[1].ttft == pytest.approx(runs[0].ttft + 0.04, abs=1e-9)
    assert runs[1].tpot == pytest.approx(runs[0].tpot, rel=1e-9)
    assert runs[1].remote_prefills == runs[0].remote_prefills == 40


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget(h100: CostModel) -> None:
    sim = ClusterSim([ReplicaSpec("both", h100, 1, max_num_batched_tokens=256)], 64)
    res = sim.run(np.array([0.0]), np.array([1000]), np.array([2]))
    chunks = [h100.iteration(c, c * (done + c / 2), 0, 0.0)
              for done, c in ((0, 256), (256, 256), (512, 256), (768, 232))]
    assert res.ttft[0] == pytest.approx(sum(chunks))


def test_a_remote_prefill_adds_the_transfer_the_prefill_did_not_hide(h100: CostModel) -> None:
    specs = [ReplicaSpec("prefill", h100, 1, max_num_batched_tokens=4096),
             ReplicaSpec("decode", h100, 1)]
    res = ClusterSim(specs, 64).run(np.array([0.0]), np.array([2000]), np.array([2]))
    prefill = h100.iteration(2000, 2000 * 1000, 0, 0.0)
    xfer = h100.transfer(2000, h100)
    tail = max(xfer / h100.model.num_layers, xfer - prefill)
    assert res.remote_prefills == 1
    assert res.ttft[0] == pytest.approx(prefill + tail)
    assert res.tpot[0] == pytest.approx(h100.iteration(0, 0.0, 1, 2000))


def test_a_handoff_to_a_stepping_decode_worker_takes_its_extra_time(h100: CostModel) -> None:
    """`handoff_busy_s` lengthens a remote prefill's TTFT only where its decode worker is
    stepping when the prefill ends, once per sequence it runs: not a prompt's alone, but one's
    beside a long decode, twice beside two."""
    specs = {k: [ReplicaSpec("prefill", c, 1, max_num_batched_tokens=4096),
                 ReplicaSpec("decode", c, 1)]
             for k, c in ((0.0, h100), (0.05, CostModel(h100.device, h100.model, 1,
                                                         dataclasses.replace(
                                                             h100.eff, handoff_busy_s=0.05))))}
    alone = {k: ClusterSim(s, 64).run(np.array([0.0]), np.array([2000]), np.array([2]))
             for k, s in specs.items()}
    assert alone[0.05].ttft[0] == pytest.approx(alone[0.0].ttft[0])
    # A short prompt decodes 400 tokens locally while a long one is prefilled remotely.
    arrivals, prompts, outputs = np.array([0.0, 0.01]), np.array([32, 2000]), np.array([400, 2])
    beside = {k: ClusterSim(s, 64).run(arrivals, prompts, outputs) for k, s in specs.items()}
    assert beside[0.05].remote_prefills == 1
    # Landing 50 ms later, it is taken at the end of the step in progress then.
    step = h100.iteration(0, 0.0, 1, 32 + 400)
    assert 0.05 - step <= beside[0.05].ttft[1] - beside[0.0].ttft[1] <= 0.05 + step
    assert beside[0.05].ttft[0] == pytest.approx(beside[0.0].ttft[0])
    # Beside two decoding prompts, it takes the extra time twice.
    arrivals, prompts, outputs = (np.array([0.0, 0.0, 0.01]), np.array([32, 32, 2000]),
                                  np.array([400, 400, 2]))
    two = {k: ClusterSim(s, 64).run(arrivals, prompts, outputs) for k, s in specs.items()}
    assert two[0.05].remote_prefills == 1
    step = h100.iteration(0, 0.0, 2, 2 * (32 + 400))
    assert 0.1 - step <= two[0.05].ttft[2] - two[0.0].ttft[2] <= 0.1 + step


def test_an_import_into_a_stepping_engine_answers_when_the_step_ends(h100: CostModel) -> None:
    """A remote prefill's first token goes out when its decode engine takes the import between
    steps: after its KV lands, within one decode step of it."""
    specs = [ReplicaSpec("prefill", h100, 1, max_num_batched_tokens=4096),
             ReplicaSpec("decode", h100, 1)]
    arrivals, prompts, outputs = np.array([0.0, 0.01]), np.array([32, 2000]), np.array([4000, 2])
    res = ClusterSim(specs, 64).run(arrivals, prompts, outputs)
    assert res.remote_prefills == 1
    prefill = h100.iteration(2000, 2000 * 1000, 0, 0.0)
    xfer = h100.transfer(2000, h100)
    landed = prefill + max(xfer / h100.model.num_layers, xfer - prefill)
    step = h100.iteration(0, 0.0, 1, 32 + 4000)  # the longest a one-request step gets here
    assert landed < res.ttft[1] <= landed + step + 1e-12
    for lookahead in (False, True):  # the same with an event for each import
        again = ClusterSim(specs, 64, lookahead=lookahead).run(arrivals, prompts, outputs)
        assert again.ttft == pytest.approx(res.ttft, abs=1e-12)


def _load(n: int, rate: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts, outputs = get_workload("conversation").sample(n, rng)
    return poisson(n, rate, rng), prompts, outputs


@pytest.mark.parametrize("roles", [("both",), ("prefill", "decode")])
def test_event_skipping_matches_one_event_per_iteration(h100: CostModel, roles) -> None:
    arrivals, prompts, outputs = _load(1500, 6.0)
    specs = [ReplicaSpec(role, h100, 2) for role in roles]
    fast = ClusterSim(specs, 64).run(arrivals, prompts, outputs)
    slow = ClusterSim(specs, 64, event_skipping=False).run(arrivals, prompts, outputs)
    assert fast.events < slow.events / 3
    for a, b in ((fast.ttft, slow.ttft), (fast.tpot, slow.tpot)):
        assert np.nanmedian(a) == pytest.approx(np.nanmedian(b), rel=0.02)
        assert np.nanpercentile(a, 90) == pytest.approx(np.nanpercentile(b, 90), rel=0.05)


def test_prompts_under_the_threshold_are_prefilled_where_they_decode(h100: CostModel) -> None:
    arrivals, prompts, outputs = _load(200, 4.0)
    specs = [ReplicaSpec("prefill", h100, 1), ReplicaSpec("decode", h100, 1)]
    threshold = int(np.median(prompts))
    res = ClusterSim(specs, threshold).run(arrivals, prompts, outputs)
    assert res.remote_prefills == int(np.sum(prompts >= threshold))
    assert ClusterSim(specs, 10**6).run(arrivals, prompts, outputs).remote_prefills == 0


def test_a_full_kv_cache_preempts_and_every_request_still_finishes() -> None:
    small = CostModel(Catalog().get("H100"), load_model("llama-3-8b"), 1, kv_memory=6000 * 131072)
    arrivals, prompts, outputs = _load(120, 20.0)
    keep = prompts + outputs <= 6000
    res = ClusterSim([ReplicaSpec("both", small, 1)], 64).run(
        arrivals[keep], prompts[keep], outputs[keep])
    assert res.preemptions > 0
    assert not np.isnan(res.ttft).any()


def test_a_speculating_request_takes_one_step_per_tokens_gained(h100: CostModel) -> None:
    """11 tokens at 2 a step: the first from the prefill, then 5 steps, each computing 3 tokens
    (a draft of 2 and the bonus) over a context that grows by 2."""
    spec = Speculation(tokens_per_step=2.0, verified_tokens=3)
    sim = ClusterSim([ReplicaSpec("both", h100, 1, max_num_batched_tokens=4096)], 64,
                     speculation=spec)
    res = sim.run(np.array([0.0]), np.array([1000]), np.array([11]))
    steps = [h100.iteration(0, 0.0, 1, 1000 + 2 * i, decode_tokens=3) for i in range(5)]
    assert res.ttft[0] == pytest.approx(h100.iteration(1000, 1000 * 500, 0, 0.0))
    assert res.tpot[0] == pytest.approx(sum(steps) / 10, rel=1e-6)
    assert res.iterations == 6


def test_speculation_for_no_request_changes_nothing(h100: CostModel) -> None:
    arrivals, prompts, outputs = _load(400, 8.0)
    specs = [ReplicaSpec("prefill", h100, 1), ReplicaSpec("decode", h100, 1)]
    plain = ClusterSim(specs, 64).run(arrivals, prompts, outputs)
    none = ClusterSim(specs, 64, speculation=Speculation(2.5, 4, share=0.0)).run(
        arrivals, prompts, outputs)
    assert np.array_equal(plain.ttft, none.ttft) and np.array_equal(plain.tpot, none.tpot)


def test_speculation_under_load_with_preemption_frees_all_kv() -> None:
    small = CostModel(Catalog().get("H100"), load_model("llama-3-8b"), 1, kv_memory=6000 * 131072)
    arrivals, prompts, outputs = _load(120, 20.0)
    keep = prompts + outputs <= 6000
    specs = [ReplicaSpec("both", small, 1)]
    load = arrivals[keep], prompts[keep], outputs[keep]
    sim = ClusterSim(specs, 64, speculation=Speculation(2.5, 4, share=0.5), seed=1)
    res = sim.run(*load)
    assert res.preemptions > 0 and not np.isnan(res.ttft).any()
    (engine,) = sim.engines
    assert engine.kv_used == pytest.approx(0, abs=1e-6) and not engine.running
    plain = ClusterSim(specs, 64).run(*load)
    assert np.nanmedian(res.tpot) < np.nanmedian(plain.tpot)  # the speculating half is faster


@pytest.mark.parametrize("roles", [("both",), ("prefill", "decode")])
def test_event_skipping_matches_per_iteration_with_speculation(h100: CostModel, roles) -> None:
    arrivals, prompts, outputs = _load(1000, 6.0)
    specs = [ReplicaSpec(role, h100, 2) for role in roles]
    spec = Speculation(1.8, 4, share=0.6)
    fast = ClusterSim(specs, 64, speculation=spec).run(arrivals, prompts, outputs)
    slow = ClusterSim(specs, 64, event_skipping=False, speculation=spec).run(
        arrivals, prompts, outputs)
    for a, b in ((fast.ttft, slow.ttft), (fast.tpot, slow.tpot)):
        assert np.nanmedian(a) == pytest.approx(np.nanmedian(b), rel=0.02)


@pytest.mark.parametrize("args", [(0.5, 4), (5.0, 4), (2.0, 4, 1.5)])
def test_a_method_that_cannot_be_is_refused(args) -> None:
    with pytest.raises(ConfigError, match="method"):
        Speculation(*args)


def test_a_prompt_elsewhere_on_the_machine_slows_the_decode_run_it_overlaps(
        h100: CostModel) -> None:
    """With `host_contention` c, a decode run overlapping another worker's prompt iteration
    goes at 1 / (1 + c) of its speed over it: the request decoding ends later by that
    iteration's time times c / (1 + c); without contention, or with no overlap, nothing moves."""
    specs = [ReplicaSpec("prefill", h100, 1, max_num_batched_tokens=4096),
             ReplicaSpec("decode", h100, 1)]
    prompts, outputs = np.array([100, 3000]), np.array([400, 2])

    def run(contention: float, second_at: float):
        sim = ClusterSim(specs, 1000, host_contention=contention)
        return sim.run(np.array([0.0, second_at]), prompts, outputs)

    def end(res) -> float:  # the decoding request's last token
        return float(res.ttft[0] + res.tpot[0] * (outputs[0] - 1))

    plain = run(0.0, 0.05)
    assert plain.remote_prefills == 1  # the long prompt is prefilled on the other worker
    prefill_s = plain.busy["prefill"] * plain.duration_s
    for c in (0.5, 1.0):
        slowed = run(c, 0.05)
        assert end(slowed) - end(plain) == pytest.approx(prefill_s * c / (1 + c), rel=0.02)
    late = 10.0  # after the first request finished: no overlap
    assert end(run(1.0, late)) == pytest.approx(end(run(0.0, late)), rel=1e-12)
    with pytest.raises(ValueError, match="host_contention"):
        ClusterSim(specs, 1000, host_contention=-0.1)
    # A worker alone on its machine has nobody to slow it.
    alone = [ReplicaSpec("both", h100, 1, max_num_batched_tokens=4096)]
    runs = [ClusterSim(alone, 1000, host_contention=c).run(np.array([0.0, 0.05]), prompts,
                                                           outputs) for c in (0.0, 1.0)]
    assert end(runs[1]) == pytest.approx(end(runs[0]), rel=1e-12)
