"""One simulated engine replica: continuous batching with chunked prefill and preemption.

It mirrors `baton.actors.scheduler`: each iteration decodes one token for every running request,
then fills the rest of the token budget with prompt chunks in arrival order (while seats and KV
last); when KV runs out the most recently admitted request is preempted and recomputed later.
Time advances per iteration, and a run of decode-only iterations is one event: the batch moves
up to the next completion at once (step time from the cost model at the run's mean context),
cut short when a request arrives (the arrival waits for the step in progress, as it does in a
real engine). With the simulator's `lookahead`, work whose outcome is already fixed gets no
event of its own: a remote prefill's import is announced to its decode engine when the prefill
ends (a run is cut, or planned to stop, at the step in progress when the KV lands), and a
prefill engine's iteration that completes every prompt with none waiting is accounted when it is
planned. Results are the same as with an event for each (`tests/planner/test_sim_lookahead.py`).

Engines that share one machine (`ClusterSim`'s `host_contention`: the workers of a benchmark
replayed on the machine it ran on) slow each other down: while one runs an iteration with prompt
chunks, the others' decode runs go at `1 / (1 + host_contention)` of their speed.
A run under way when such an iteration starts ends later; one that starts during it is planned
longer; a run cut short keeps the steps it made at the speed it had.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any

from baton.cluster.planner.contention import Slowdown
from baton.cluster.planner.cost import CostModel
from baton.cluster.planner.sim_request import SimRequest


class SimEngine:
    """A replica; `sim` provides `schedule(t, callback)` and hears `finished` / `prefilled`."""

    def __init__(self, sim: Any, cost: CostModel, role: str, name: str,
                 max_num_batched_tokens: int, max_num_seqs: int):
        self.sim = sim
        self.cost = cost
        self.role = role
        self.name = name
        self.budget = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.capacity = cost.kv_capacity_tokens
        self.waiting: deque[SimRequest] = deque()  # prompt tokens left (new or preempted)
        # Decoding, in admission order; each request's progress is read off `clock` (decode steps
        # this engine ran), so a run of k steps costs O(finishing requests), not O(batch).
        self.running: dict[SimRequest, None] = {}
        self.clock = 0
        self._ends: list[tuple[int, int, SimRequest]] = []  # (end clock, index, request)
        self.prefilling: list[SimRequest] = []  # admitted, prompt partly computed
        self.joining: list[SimRequest] = []  # imported while an iteration ran
        # Imports announced when their prefill ended: (time the KV lands, index, request).
        self._expected: list[tuple[float, int, SimRequest]] = []
        # A prefill engine's last iteration, accounted when planned and without an event (nothing
        # else happens here at its end unless a prompt arrives meanwhile): when it ends.
        self._ahead = sim.lookahead and role == "prefill"
        self._settle_at: float | None = None
        self.kv_used: float = 0
        self.decode_ctx: float = 0  # KV tokens of the running requests
        self.gain: float = 0  # tokens the running requests gain per decode step (their number)
        self.verify: float = 0  # tokens a decode step computes for them (their number)
        self.busy = False
        self._version = 0
        self._group: tuple[float, float, int] = (0.0, 0.0, 0)  # (start, step s, steps)
        self._chunks: list[tuple[SimRequest, int]] = []
        self.iterations = 0
        self.preemptions = 0
        self.busy_s = 0.0
        self._decode_step = cost.decode_step
        # What an iteration with prompt chunks costs beyond the cost model's figure.
        self._prefill_scale = (cost.eff.prefill_scale if role == "prefill"
                               else cost.eff.prompt_scale)
        self._schedule = sim.schedule
        self._skipping: bool = sim.event_skipping
        self.host: list[SimEngine] = []  # the other engines on this machine
        self._slow: Slowdown | None = None  # with `host`: this run's slow windows
        self._heavy_until = -math.inf  # the end of this engine's iteration with prompt chunks

    def share_machine(self, others: list[SimEngine], contention: float) -> None:
        """Run beside `others` on one machine (see the module's doc); alone, nothing slows."""
        if others:
            self.host = others
            self._slow = Slowdown(contention)

    # -- the outside world ------------------------------------------------------------------------

    def add(self, req: SimRequest, now: float) -> None:
        """Queue a prompt for prefill here."""
        self.waiting.append(req)
        self._wake(now)

    def reserve(self, tokens: int) -> bool:
        """Hold KV for a remote prefill's import (False: no room, prefill locally instead)."""
        if self.kv_used + tokens > self.capacity:
            return False
        self.kv_used += tokens
        return True

    def admit_import(self, req: SimRequest, now: float) -> None:
        """A remote prefill's KV arrived: start decoding (its reservation is already held)."""
        req.ctx = req.prompt
        self.joining.append(req)  # joins the batch when the iteration in progress ends
        self._wake(now)

    def expect(self, req: SimRequest, at: float) -> None:
        """A remote prefill's KV will arrive at `at` (later than now; its reservation is held):
        the same as `admit_import` then, without an event of its own when a run is under way
        (the run is cut at the step in progress at `at` now, or planned to end there)."""
        req.ctx = req.prompt
        heapq.heappush(self._expected, (at, req.index, req))
        if self.busy:
            self._cut(at)
        else:
            self.sim.schedule(at, self._wake_idle, None)

    # -- iterations -------------------------------------------------------------------------------

    def _wake(self, now: float) -> None:
        if self._settle_at is not None:
            if now < self._settle_at:  # the iteration's end must plan what arrived: an event
                self._version += 1
                self.sim.schedule(self._settle_at, self._resume, self._version)
                self._settle_at = None
                return
            self._settle_at = None
            self.busy = False
        if not self.busy:
            self._plan(now)
        else:
            self._cut(now)

    def _wake_idle(self, now: float, _: Any) -> None:
        if not self.busy:  # busy: a run planned since already stops for what arrives now
            self._plan(now)

    def _cut(self, at: float) -> None:
        """Cut the decode run under way short at the step in progress at `at`."""
        start, step, steps = self._group
        if steps > 1:
            slow = self._slow
            work = at - start if slow is None else slow.work(start, at)
            done = min(steps, max(1, math.ceil(work / step - 1e-9)))
            if done < steps:
                self._version += 1
                self._group = (start, step, done)
                end = start + done * step if slow is None else slow.when(start, done * step)
                self.sim.schedule(end, self._done, self._version)

    def _start(self, now: float, step: float, steps: int) -> None:
        """Run `steps` iterations of `step` s from `now` as one event, up to an expected import."""
        self.busy = True
        self._version += 1
        if steps > 1 and self._expected:
            upto = math.ceil((self._expected[0][0] - now) / step - 1e-9)
            if upto < steps:
                steps = upto if upto > 1 else 1
        self._group = (now, step, steps)
        end = now + step * steps
        if self._slow is not None:
            self._slow.clear()
            heavy = max(e._heavy_until for e in self.host)
            if heavy > now and not self._chunks:  # a prompt iteration is under way elsewhere
                self._slow.add(now, heavy)
                end = self._slow.when(now, step * steps)
        self._schedule(end, self._done, self._version)

    def _contend(self, now: float, end: float) -> None:
        """This engine runs a prompt iteration until `end`: the others' runs slow meanwhile."""
        self._heavy_until = end
        for other in self.host:
            other._slowed(now, end)

    def _slowed(self, start: float, end: float) -> None:
        """Another engine on this host runs a prompt iteration over [start, end): the decode run
        under way here runs slower over it, and ends later."""
        if not self.busy or self._settle_at is not None or self._chunks:
            return
        assert self._slow is not None, "only an engine sharing its machine is slowed"
        t0, step, steps = self._group
        self._slow.add(start, end)
        self._version += 1
        self._schedule(self._slow.when(t0, step * steps), self._done, self._version)

    def _join(self, req: SimRequest) -> None:
        steps = req.left if req.gain == 1 else math.ceil(req.left / req.gain)
        req.joined, req.ctx0, req.end = self.clock, req.ctx, self.clock + steps
        self.decode_ctx += req.ctx
        self.gain += req.gain
        self.verify += req.verify
        self.running[req] = None
        heapq.heappush(self._ends, (req.end, req.index, req))

    def _leave(self, req: SimRequest) -> None:
        """Take `req` out of the decode batch with its `left` and `ctx` brought up to date."""
        steps = self.clock - req.joined
        if req.gain == 1:
            made = steps
        else:  # the batch's KV grew by `gain` a step for it: keep the tokens it really made
            grown = req.gain * steps
            made = min(req.left, int(grown))
            self.kv_used -= grown - made
            self.decode_ctx -= grown - made
        req.ctx = req.ctx0 + made
        req.left -= made
        self.gain -= req.gain
        self.verify -= req.verify
        del self.running[req]

    def _next_end(self) -> int:
        """Decode steps until the first running request finishes (stale heap entries dropped)."""
        ends = self._ends
        while ends[0][2] not in self.running or ends[0][2].end != ends[0][0]:
            heapq.heappop(ends)
        return ends[0][0] - self.clock

    def _plan(self, now: float) -> None:
        # An import joins between iterations, and its first token goes out then (as a worker's
        # engine loop takes an import's completion between steps).
        if self.joining:
            for req in self.joining:
                req.first = now
                self._join(req)
            self.joining = []
        expected = self._expected
        while expected and expected[0][0] <= now:
            req = heapq.heappop(expected)[2]
            req.first = now
            self._join(req)
        running, partial = self.running, self.prefilling
        n = len(running)
        if n and not partial and not self.waiting and self.kv_used + self.gain <= self.capacity:
            self._decode_run(now, n)  # the common case, first
            return
        while running and self.kv_used + self.gain > self.capacity:
            if partial:
                self._preempt(partial.pop())
            else:
                victim = next(reversed(running))
                self._leave(victim)
                self._preempt(victim)
        n = len(running)
        if not partial and not self.waiting:  # decode only (every decode-role engine, mostly)
            if not n:
                self._idle()
                return
            self._decode_run(now, n)
            return
        budget = self.budget - math.ceil(self.verify - 1e-9)  # whole tokens, as planned
        seats = self.max_seqs - n - len(partial)
        chunks: list[tuple[SimRequest, int]] = []
        p_tokens = 0
        grow = self.gain  # KV the decode tokens take this step
        p_ctx = 0.0
        whole = True  # every chunk is the rest of its prompt
        # Admitted prompts first (most recently admitted preempted when KV is short), then new.
        i = 0
        while i < len(partial) and budget > 0:
            req = partial[i]
            c = min(req.todo, budget)
            while self.kv_used + p_tokens + grow + c > self.capacity and partial[-1] is not req:
                self._preempt(partial.pop())
            if self.kv_used + p_tokens + grow + c > self.capacity:
                break
            chunks.append((req, c))
            p_ctx += c * (req.ctx + c / 2)
            p_tokens += c
            budget -= c
            whole = whole and c == req.todo
            i += 1
        while self.waiting and budget > 0 and seats > 0 and len(chunks) == len(partial):
            req = self.waiting[0]
            c = min(req.todo, budget)
            if self.kv_used + p_tokens + grow + c > self.capacity:
                break
            self.waiting.popleft()
            partial.append(req)
            chunks.append((req, c))
            p_ctx += c * (req.ctx + c / 2)
            p_tokens += c
            budget -= c
            whole = whole and c == req.todo
            seats -= 1
        if not chunks and partial and not n:  # a stuck prompt: free the latest one's blocks
            self._preempt(partial.pop())
            self._plan(now)
            return
        if not chunks and not n:
            self._idle()
            return
        if not chunks:
            self._decode_run(now, n)
            return
        self._chunks = chunks
        step = self._prefill_scale * self.cost.iteration(p_tokens, p_ctx, n, self.decode_ctx,
                                                         len(chunks), self.verify)
        if self._slow is not None:
            self._contend(now, now + step)
        if self._ahead and whole and not self.waiting and len(chunks) == len(partial):
            # every prompt completes and none waits: nothing happens here at the step's end
            self.busy = True
            self._group = (now, step, 1)
            self._account(now + step)  # its imports are announced now, ahead of their time
            self._settle_at = now + step
            return
        self._start(now, step, 1)

    def _resume(self, now: float, version: int) -> None:
        if version == self._version:
            self._plan(now)

    def _idle(self) -> None:
        self.busy = False
        if self._expected:
            self.sim.schedule(self._expected[0][0], self._wake_idle, None)

    def _decode_run(self, now: float, n: int) -> None:
        """Decode steps up to the next completion (or the KV limit) as one event."""
        steps = 1
        gain = self.gain
        if self._skipping:
            steps = self._next_end()
            room = int((self.capacity - self.kv_used) // gain)
            if room < steps:
                steps = room if room > 1 else 1
        self._start(now, self._decode_step(n, self.decode_ctx + gain * (steps - 1) / 2,
                                           self.verify), steps)

    def _done(self, now: float, version: int) -> None:
        if version != self._version:
            return  # superseded by a shorter run
        self._account(now)
        self._plan(now)

    def _account(self, now: float) -> None:
        """The iterations of `_group`, ending at `now`: tokens, completions, finishes."""
        start, step, steps = self._group
        self.iterations += steps
        self.busy_s += now - start
        running = self.running
        if running:
            grown = self.gain * steps
            self.kv_used += grown
            self.decode_ctx += grown
            self.clock = clock = self.clock + steps
            ends = self._ends
            while ends and ends[0][0] <= clock:
                end, _, r = heapq.heappop(ends)
                if r.end == end and r in running:
                    self._leave(r)
                    self._finish(r, now)
        if self._chunks:
            for req, c in self._chunks:
                req.todo -= c
                req.ctx += c
                self.kv_used += c
                if req.todo == 0:
                    self.prefilling.remove(req)
                    self._prefilled(req, now)
            self._chunks = []

    def _prefilled(self, req: SimRequest, now: float) -> None:
        if self.role == "prefill":  # its KV leaves; the decode side holds it from now on
            self.kv_used -= req.ctx
            req.ctx = 0
            self.sim.prefilled(req, now)
            return
        if req.first < 0:
            req.first = now
            req.left -= 1
        if req.left <= 0:
            self._finish(req, now, decoding=False)
            return
        self._join(req)

    def _finish(self, req: SimRequest, now: float, decoding: bool = True) -> None:
        req.finish = now
        self.kv_used -= req.ctx
        if decoding:
            self.decode_ctx -= req.ctx
        req.ctx = 0
        self.sim.finished(req, now)

    def _preempt(self, req: SimRequest) -> None:
        """Free `req`'s KV (a running request, or a prompt partly computed) to recompute later."""
        self.preemptions += 1
        self.kv_used -= req.ctx
        if req.todo == 0:  # decoding: its prompt and what it generated so far are recomputed
            self.decode_ctx -= req.ctx
            req.todo = req.ctx
        else:
            req.todo += req.ctx
        req.ctx = 0
        self.waiting.appendleft(req)

