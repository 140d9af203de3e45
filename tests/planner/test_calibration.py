"""The simulator fed this machine's measured profile predicts a real engine's latencies.

A tiny model keeps it short: `baton profile`'s measurement on a small grid, then the same open-loop
requests through the real engine and through the simulator. Millisecond steps on a shared
machine are noisy, so the bound here is loose (within 60%); `baton bench plan --calibrate` runs
the default model, where the benchmark's 25% is the target.
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


def test_a_profiled_engine_is_predicted_within_the_noise(profile) -> None:
    engine = Engine(model=MODEL, dtype="float32", num_threads=1, max_num_batched_tokens=256,
                    max_num_seqs=16)
    result = compare(engine, profile, rate=30.0, n=60, prompt=(16, 200), output=(8, 40))
    assert abs(result["error"]["ttft_p50"]) < 0.6, result
    assert abs(result["error"]["tpot_p50"]) < 0.6, result
