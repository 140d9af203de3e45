"""What a benchmark run keeps of each worker's load: `worker_load` and `bench serve`'s target.
(`bench pd`'s runs keep them too, checked on a real cluster in `test_bench_pd.py`.)"""

from __future__ import annotations

import asyncio

import pytest

from baton.ops.bench import serve_targets, worker_load
from baton.ops.bench.openloop import run_open_loop
from baton.ops.bench.transformers_serve import StreamProgress
from baton.ops.bench.workload import BenchRequest


def _info(pid: int, role: str, steps: int, step_s: float, cpu_s: float,
          process_cpu_s: float) -> dict:
    loop = {"steps": steps, "step_s": step_s, "forward_s": 0.9 * step_s, "calls_s": 0.01 * steps,
            "deliver_s": 0.02 * steps, "cpu_s": cpu_s}
    return {"pid": pid, "role": role, "loop_timings": loop, "process_cpu_s": process_cpu_s}


def test_a_runs_load_is_each_workers_difference_and_a_restarted_one_is_left_out() -> None:
    before = [_info(1, "prefill", 10, 2.0, 2.5, 3.0), _info(2, "decode", 100, 5.0, 6.0, 8.0),
              _info(3, "decode", 50, 1.0, 1.0, 1.5)]
    after = [_info(1, "prefill", 14, 3.5, 4.0, 4.8), _info(2, "decode", 160, 8.0, 9.5, 12.0),
             _info(4, "decode", 5, 0.2, 0.2, 0.3)]  # pid 3 restarted as pid 4 during the run
    loads = worker_load.between(before, after, wall_s=4.0)
    assert [(w["pid"], w["role"]) for w in loads] == [(1, "prefill"), (2, "decode")]
    prefill, decode = loads
    assert prefill["steps"] == 4 and prefill["step_s"] == pytest.approx(1.5)
    assert prefill["forward_s"] == pytest.approx(0.9 * 1.5)
    assert decode["calls_s"] == pytest.approx(0.6) and decode["deliver_s"] == pytest.approx(1.2)
    assert decode["loop_cpu_s"] == pytest.approx(3.5)
    assert decode["process_cpu_s"] == pytest.approx(4.0)
    assert {w["wall_s"] for w in loads} == {4.0}
    # A worker whose counters went back (a new loop under the same pid) is left out too.
    assert worker_load.between(after[:1], before[:1], wall_s=1.0) == []


class _Served(serve_targets.BatonTarget):
    """Baton's target with its streams faked: one token every 10 ms."""

    async def _run(self, requests, arrivals):
        async def stream(n: int):
            for k in range(1, n + 1):
                await asyncio.sleep(0.01)
                yield StreamProgress(tokens=k, prompt_tokens=3)

        return await run_open_loop(lambda i, r: self._watched(i, r, stream(r.max_tokens)),
                                   requests, arrivals)


def test_bench_serves_target_notes_its_workers_load_over_each_run(monkeypatch) -> None:
    counters = {"n": 0}

    def snapshot(handles):
        assert handles == ["prefill-handle", "decode-handle"]  # the controller's listing
        counters["n"] += 1
        k = counters["n"]
        return [_info(7, "prefill", 3 * k, 0.5 * k, 0.4 * k, 0.5 * k),
                _info(8, "decode", 20 * k, 1.0 * k, 0.9 * k, 1.1 * k)]

    monkeypatch.setattr(worker_load, "snapshot", snapshot)
    target = _Served("127.0.0.1:1", None, workers=lambda: [
        {"role": "prefill", "handle": "prefill-handle"},
        {"role": "decode", "handle": "decode-handle"}])
    _, wall = target.run([BenchRequest([2], 4), BenchRequest([1], 3)], [0.0, 0.0])
    loads = target.notes()["workers"]
    assert [(w["role"], w["steps"]) for w in loads] == [("prefill", 3), ("decode", 20)]
    assert all(w["wall_s"] == wall for w in loads)
    target.run([BenchRequest([2], 2)], [0.0])  # the next run's load replaces the last one's
    assert [w["steps"] for w in target.notes()["workers"]] == [3, 20]
    assert counters["n"] == 4
    # Without a way to list the workers (a peer, or no cluster handle), no loads are noted.
    bare = _Served("127.0.0.1:1", None)
    bare.run([BenchRequest([2], 2)], [0.0])
    assert "workers" not in bare.notes()
