"""A profile measured on this machine's real engine drives the simulator beside a real run.

A tiny model keeps it short: `baton profile`'s measurement on a small grid, then the same open-loop
requests through the real engine and through the simulator. How close the two come is a timing
question, so it is measured by `baton bench plan --calibrate` (default model, target 25%), not
asserted here: on a shared 2-core machine the real run's latencies swing with other processes'
load (a run beside the Ray tests measured a TTFT p50 of 1.4 s where the profile taken a minute
earlier predicted 0.03 s).
"""

from __future__ import annotations

import pytest

from baton.actors.engine import Engine
from baton.ops.bench.plan_calibration import compare
from baton.ops.profile_run import measure

MODEL = "tiny:llama"


@pytest.fixture(scope="module")
def profile():
    return measure(model=MODEL, dtype="float32", threads=1, prefill_lens=(16, 64, 256),
                   batches=(1, 4, 16), contexts=(16, 128), decode_steps=9, repeats=5)


def test_a_measured_profile_drives_the_simulator_beside_a_real_run(profile) -> None:
    assert [n for n, _ in profile.prefill] == [16, 64, 256]
    assert all(s > 0 for _, s in profile.prefill) and all(s > 0 for *_, s in profile.decode)
    engine = Engine(model=MODEL, dtype="float32", num_threads=1, max_num_batched_tokens=256,
                    max_num_seqs=16)
    result = compare(engine, profile, rate=10.0, n=30, prompt=(16, 200), output=(8, 40))
    for side in ("real", "sim"):
        for key in ("ttft_p50_s", "tpot_p50_s"):
            assert 0 < result[side][key] < 60, result
    assert set(result["error"]) == {"ttft_p50", "tpot_p50"}


def test_every_timed_decode_step_runs_the_whole_batch() -> None:
    """With 16 tokens a step, 8 prompts of 64 take 32 steps to prefill, and the first ones
    decode meanwhile: none may finish before the timed steps end (`measure` raises if a timed
    step runs fewer requests than its batch)."""
    profile = measure(model=MODEL, dtype="float32", threads=1, prefill_lens=(16,),
                      batches=(1, 8), contexts=(64,), decode_steps=4)
    assert [(b, c) for b, c, _ in profile.decode] == [(1, 64), (8, 64)]
