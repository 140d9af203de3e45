"""What each Baton worker's process did during one benchmark run, from its `info()` before and
after: engine steps, the engine loop's busy and CPU time by part (`LoopTimings`), and the whole
process's CPU time.

A worker is pinned to one core with one engine thread; the rest of its process (Ray's calls, the
output streams, the KV link) shares that core. `process_cpu_s - loop_cpu_s` is that other CPU
time, and `step_s / steps` the step time a served worker really had: with the run's wall time,
enough to see where a loaded worker's time went.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray

LOOP_FIELDS = ("steps", "step_s", "forward_s", "calls_s", "deliver_s")
T = TypeVar("T")


def snapshot(workers: Sequence[Any]) -> list[dict[str, Any]]:
    """Every worker's `info()` now."""
    return ray.get([w.info.remote() for w in workers])


def between(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]],
            wall_s: float) -> list[dict[str, Any]]:
    """Per worker (matched by pid), what the snapshots `before` and `after` a run of `wall_s`
    seconds differ by; a worker that appeared or restarted in between is left out."""
    start = {b["pid"]: b for b in before}
    out = []
    for a in after:
        b = start.get(a["pid"])
        if b is None:
            continue
        lb, la = b["loop_timings"], a["loop_timings"]
        if la["steps"] < lb["steps"]:
            continue
        row: dict[str, Any] = {"role": a["role"], "pid": a["pid"], "wall_s": wall_s}
        row.update({k: la[k] - lb[k] for k in LOOP_FIELDS})
        row["loop_cpu_s"] = la["cpu_s"] - lb["cpu_s"]
        row["process_cpu_s"] = a["process_cpu_s"] - b["process_cpu_s"]
        out.append(row)
    return out


def during(workers: Sequence[Any],
           run: Callable[[], tuple[T, float]]) -> tuple[T, float, list[dict[str, Any]]]:
    """`run()` (its result and wall seconds) and what `workers` did meanwhile (`between`)."""
    before = snapshot(workers)
    result, wall = run()
    return result, wall, between(before, snapshot(workers), wall)
