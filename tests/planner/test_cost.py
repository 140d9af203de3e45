"""The cost model's calibration recovers the efficiencies a GPU's timings were made with."""

from __future__ import annotations

import pytest

from baton.cluster.planner.catalog import Catalog
from baton.cluster.planner.cost import CostModel, Efficiency, calibrate
from baton.cluster.planner.model import BUILTIN, load_model
from baton.cluster.planner.profile import Profile


def test_a_gpu_profile_calibrates_compute_memory_and_overhead() -> None:
    gpu, model = Catalog().get("H100"), load_model("llama-3-8b")
    truth = CostModel(gpu, model, 1, Efficiency(compute=0.4, memory=0.6, overhead_s=0.003,
                                                prefill_overhead_s=0.006))
    profile = Profile(
        device="H100", model="llama-3-8b", model_config=BUILTIN["llama-3-8b"],
        prefill=[(n, truth.iteration(n, n * n / 2, 0, 0.0)) for n in (512, 1024, 2048, 4096)],
        decode=[(b, c, truth.iteration(0, 0.0, b, b * c)) for b in (1, 8, 32)
                for c in (512, 2048)])
    eff = calibrate(gpu, model, profile)
    assert eff.compute == pytest.approx(0.4, rel=0.05)
    assert eff.memory == pytest.approx(0.6, rel=0.05)
    assert eff.overhead_s == pytest.approx(0.003, rel=0.1)
    assert eff.prefill_overhead_s == pytest.approx(0.006, rel=0.1)


def test_steps_that_paid_a_first_time_cost_do_not_move_the_calibration() -> None:
    """A GPU profile's first steps at a new shape can take 10x (allocations, library plans): the
    fit must go by the other points (two of eight here, as measured on an H200)."""
    gpu, model = Catalog().get("H200"), load_model("llama-3-8b")
    truth = CostModel(gpu, model, 1, Efficiency(compute=0.5, memory=0.7, overhead_s=0.004))
    decode = [(b, c, truth.iteration(0, 0.0, b, b * c)) for b in (1, 16, 64, 128)
              for c in (512, 2048)]
    decode[2] = (64, 512, 10 * decode[2][2])
    decode[3] = (128, 512, 3 * decode[3][2])
    prefill = [(n, truth.iteration(n, n * n / 2, 0, 0.0)) for n in (256, 1024, 2048, 4096)]
    prefill[2] = (2048, 3 * prefill[2][1])
    eff = calibrate(gpu, model, Profile(device="H200", model="llama-3-8b",
                                        model_config=BUILTIN["llama-3-8b"], prefill=prefill,
                                        decode=decode))
    assert eff.compute == pytest.approx(0.5, rel=0.1)
    assert eff.memory == pytest.approx(0.7, rel=0.1)
    assert eff.overhead_s == pytest.approx(0.004, rel=0.15)


@pytest.mark.parametrize("model,eff", [
    ("llama-3-8b", Efficiency()),
    ("mixtral-8x7b", Efficiency()),
    ("llama-3-8b", Efficiency(per_seq_s=0.0002, overlap=False)),
])
def test_a_decode_step_costs_exactly_what_the_same_iteration_does(model: str,
                                                                   eff: Efficiency) -> None:
    cost = CostModel(Catalog().get("H100"), load_model(model), 2, eff)
    for n, context in ((1, 17.0), (7, 9000.5), (64, 131072.25), (256, 3.5e6)):
        assert cost.decode_step(n, context) == cost.iteration(0, 0.0, n, context)
        # Verifying drafts: 4 tokens a request, each attending over its request's context.
        verify = cost.decode_step(n, context, 4 * n)
        assert verify == cost.iteration(0, 0.0, n, context, decode_tokens=4 * n)
        # Free while a step is memory-bound on a GPU; never free where compute adds up (CPU).
        assert verify >= cost.decode_step(n, context)
        assert eff.overlap or verify > cost.decode_step(n, context)
