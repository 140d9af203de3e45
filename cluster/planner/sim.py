"""A discrete-event simulator of a Baton cluster: router, pools of engines, KV transfers.

Requests arrive at the router, which picks workers with the router's own code
(`baton.router.dispatch.WorkerSet`: fewest requests in flight, ties in turn; both holds last the
whole request, as in `Dispatcher`) and applies conditional disaggregation with the decode worker's
own rule (`prefill_remotely`: a prefill worker exists and the prompt has at least
`prefill_threshold` uncached tokens). Requests that share a cached prefix (a system prompt: the
same `prefix_groups` id) are steered by the router's own prefix-cache affinity
(`baton.router.affinity.PrefixAffinity`: to the worker that last took that prefix, while it has
at most `slack` more requests in flight than the least loaded). A remote prefill reserves the
prompt's KV on the decode worker first (no room: prefill locally, as the worker does), runs on
the prefill worker, and its KV streams layer by layer while later layers compute: the decode
worker has it `max(transfer / layers, transfer - prefill time)` after the prefill ends, and the
client gets the first token then. Workloads carry lengths only: a prompt's length is what its
worker computes (what a shared prefix spares is taken off before). An acceleration method enters
as measured (`Speculation`: tokens gained and tokens verified per decode step), for a share of
the requests, or per request (a replayed benchmark's own requests, as each was served). The
serving path's own time per request (`Efficiency.request_s`: API, router, actor calls; the decode
pool's) delays each prompt's arrival at the router and so every timestamp after it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from baton.cluster.planner.cost import CostModel
from baton.cluster.planner.engine_sim import SimEngine
from baton.cluster.planner.sim_request import SimRequest
from baton.errors import ConfigError
from baton.router.affinity import PrefixAffinity
from baton.router.dispatch import WorkerSet, prefill_remotely


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """`count` replicas of one engine shape in one role (prefill, decode or both)."""

    role: str
    cost: CostModel
    count: int
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256


@dataclass(frozen=True, slots=True)
class Speculation:
    """An acceleration method as `baton bench spec` measures it, for `share` of the requests:
    each decode step gains `tokens_per_step` tokens for a request on average (its mean accepted
    draft length plus one) and computes `verified_tokens` for it (its draft plus one)."""

    tokens_per_step: float
    verified_tokens: int
    share: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.tokens_per_step <= self.verified_tokens:
            raise ConfigError(f"a method gains 1 to verified_tokens ({self.verified_tokens}) "
                              f"tokens a step, not {self.tokens_per_step}")
        if not 0 <= self.share <= 1:
            raise ConfigError(f"the share of requests using a method is 0 to 1, not {self.share}")


@dataclass(slots=True)
class SimResult:
    """Per-request TTFT and TPOT (NaN: never served), and how the engines were used."""

    ttft: np.ndarray
    tpot: np.ndarray
    output: np.ndarray
    duration_s: float  # first arrival to last completion
    remote_prefills: int
    preemptions: int
    iterations: int
    events: int
    busy: dict[str, float] = field(default_factory=dict)  # role -> mean busy share

    def attainment(self, slo_ttft: float, slo_tpot: float) -> float:
        ok = (self.ttft <= slo_ttft) & ((self.tpot <= slo_tpot) | (self.output < 2))
        return float(np.mean(ok))

    def p50(self, values: np.ndarray) -> float:
        v = values[~np.isnan(values)]
        return float(np.percentile(v, 50)) if len(v) else float("nan")


class ClusterSim:
    """One run of a workload through one layout; `run` returns a `SimResult`.

    With `event_skipping` a decode-only batch advances to its next completion (or the next
    arrival at its engine) in one event; without, one event per iteration."""

    def __init__(self, replicas: Sequence[ReplicaSpec], prefill_threshold: int,
                 event_skipping: bool = True, lookahead: bool = True,
                 speculation: Speculation | None = None, seed: int = 0,
                 host_contention: float = 0.0):
        """`host_contention` > 0: every replica runs on one machine, and while one runs an
        iteration with prompt chunks the others' decode runs go at `1 / (1 + host_contention)`
        of their speed (see `engine_sim`); 0: each replica on hardware of its own."""
        if not any(r.role in ("decode", "both") and r.count for r in replicas):
            raise ConfigError("a layout needs at least one decode or both replica")
        self.threshold = prefill_threshold
        self.speculation = speculation
        self._seed = seed  # which requests use the method
        # False: one event per decode iteration (slow; the reference event skipping must match).
        self.event_skipping = event_skipping
        # True: a decode engine hears of an import when its prefill ends and plans its runs
        # around it; False: an event when the KV lands (the reference lookahead must match).
        self.lookahead = lookahead
        self.engines: list[SimEngine] = []
        for spec in replicas:
            for i in range(spec.count):
                self.engines.append(SimEngine(self, spec.cost, spec.role, f"{spec.role}-{i}",
                                              spec.max_num_batched_tokens, spec.max_num_seqs))
        if host_contention < 0:
            raise ValueError(f"host_contention must be >= 0, got {host_contention}")
        if host_contention > 0:
            for e in self.engines:
                e.share_machine([other for other in self.engines if other is not e],
                                host_contention)
        self.decode = WorkerSet([e for e in self.engines if e.role in ("decode", "both")])
        # A constant delay on every arrival: routing and batching see the same gaps between them.
        self.request_s = max(e.cost.eff.request_s for e in self.engines
                             if e.role in ("decode", "both"))
        self.prefill = WorkerSet([e for e in self.engines if e.role == "prefill"])
        self.affinity = PrefixAffinity()
        self._heap: list[tuple[float, int, Callable[[float, Any], None], Any]] = []
        self._seq = itertools.count()
        self.remote_prefills = 0
        self.events = 0
        self._first: list[float] = []
        self._finish: list[float] = []

    def schedule(self, t: float, fn: Callable[[float, Any], None], arg: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, arg))

    def run(self, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray,
            prefix_groups: np.ndarray | None = None,
            decoding: Sequence[tuple[float, float] | None] | None = None) -> SimResult:
        """Serve the requests (arrival s, prompt tokens to compute, output tokens); requests with
        the same `prefix_groups` id >= 0 share a cached prefix (affinity applies). `decoding`
        gives each request's own (tokens gained, tokens verified) per decode step (None: one
        and one) in place of `speculation`."""
        n = len(arrivals)
        groups = prefix_groups.tolist() if prefix_groups is not None else None
        times = (arrivals + self.request_s).tolist() if self.request_s else arrivals.tolist()
        lens, outs = prompts.tolist(), outputs.tolist()
        # Each request's first token and finish time, kept as it finishes (-1: not served).
        self._first = [-1.0] * n
        self._finish = [-1.0] * n
        limit = min(e.capacity for e in self.decode)
        spec = self.speculation
        uses = (np.random.default_rng(self._seed).random(n) < spec.share).tolist() if spec else []
        heap = self._heap
        pop = heapq.heappop
        events = 0
        for i in range(n + 1):
            t_next = times[i] if i < n else math.inf
            while heap and heap[0][0] < t_next:  # an arrival goes before an event at its time
                t, _, fn, arg = pop(heap)
                fn(t, arg)
                events += 1
            if i == n:
                break
            events += 1
            if lens[i] + outs[i] <= limit:
                req = SimRequest(i, t_next, lens[i], outs[i])
                if decoding is not None:
                    if (measured := decoding[i]) is not None:
                        req.gain, req.verify = measured
                elif uses and uses[i]:
                    assert spec is not None
                    req.gain, req.verify = spec.tokens_per_step, spec.verified_tokens
                self._arrive(req, groups[i] if groups is not None else -1)
        first, finish = np.array(self._first), np.array(self._finish)
        served = finish >= 0
        ttft = np.where(served, first - arrivals, np.nan)
        tpot = np.where(served & (outputs >= 2), (finish - first) / np.maximum(outputs - 1, 1),
                        np.nan)
        end = float(finish.max()) if n else 0.0
        span = max(end - float(arrivals[0]), 1e-9) if n else 1e-9
        busy: dict[str, list[float]] = {}
        for e in self.engines:
            busy.setdefault(e.role, []).append(e.busy_s / span)
        return SimResult(ttft=ttft, tpot=tpot, output=outputs.astype(float), duration_s=span,
                         remote_prefills=self.remote_prefills,
                         preemptions=sum(e.preemptions for e in self.engines),
                         iterations=sum(e.iterations for e in self.engines), events=events,
                         busy={k: float(np.mean(v)) for k, v in busy.items()})

    # -- the router and the decode worker's admission ---------------------------------------------

    def _arrive(self, req: SimRequest, group: int = -1) -> None:
        now = req.arrival
        if group >= 0:  # the router's prefix-cache affinity, as `Dispatcher.generate` applies it
            hashes = [group]
            worker = self.decode.pick(prefer=self.affinity.choose(hashes, self.decode.loads()))
            self.affinity.remember(hashes, worker)
        else:
            worker = self.decode.pick()
        prefill = self.prefill.pick()
        self.decode.take(worker)
        if prefill is not None:
            self.prefill.take(prefill)
        req.held = prefill
        req.decode = worker
        # Every prompt is uncached here (lengths only); the decode worker reserves before the
        # prefill worker computes, and prefills locally when it cannot.
        if prefill_remotely(prefill is not None, req.prompt, self.threshold) and \
                worker.reserve(req.prompt):
            self.remote_prefills += 1
            req.remote = True
            req.prefill = prefill
            req.started = now
            prefill.add(req, now)
        else:
            worker.add(req, now)

    def prefilled(self, req: SimRequest, now: float) -> None:
        """A prefill worker finished `req`'s prompt: its KV reaches the decode worker later."""
        xfer = req.prefill.cost.transfer(req.prompt, req.decode.cost)
        layers = req.prefill.cost.model.num_layers
        eff = req.prefill.cost.eff
        tail = max(xfer / layers, xfer - (now - req.started)) + eff.handoff_s
        decode = req.decode
        if decode.busy:  # the receiver and the import wait on a stepping engine, the longer the
            # more it holds (a prompt it has or computes now decodes by the time the KV lands)
            held = len(decode.running) + len(decode.prefilling) + len(decode.waiting)
            tail += eff.handoff_busy_s * held
        req.todo = 0
        if self.lookahead and req.left > 1:
            req.first = now + tail
            req.left -= 1
            req.decode.expect(req, now + tail)
        else:
            self.schedule(now + tail, self._imported, req)

    def _imported(self, now: float, req: SimRequest) -> None:
        req.first = now
        req.left -= 1
        if req.left <= 0:
            req.decode.kv_used -= req.prompt
            req.finish = now
            self.finished(req, now)
            return
        req.decode.admit_import(req, now)

    def finished(self, req: SimRequest, now: float) -> None:
        """`req` ended: the router's holds on its workers go."""
        self._first[req.index] = req.first
        self._finish[req.index] = req.finish
        self.decode.release(req.decode)
        if req.held is not None:
            self.prefill.release(req.held)
            req.held = None
