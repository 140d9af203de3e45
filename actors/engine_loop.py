"""Runs an engine on its own thread, so a worker can take calls while the engine steps.

The engine is single-threaded: every touch goes through `call` (run on the loop thread between
steps). Outputs are routed to per-request subscribers as the engine produces them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import TypeVar

from baton.actors.engine import Engine
from baton.actors.handoff import HandoffEngine
from baton.outputs import RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class LoopTimings:
    """Where the loop thread's busy time went since it started (seconds, summed).

    `step_s` is inside `engine.step()` (its forward pass is `forward_s`), `calls_s` runs other
    threads' calls between steps, `deliver_s` hands outputs to their subscribers. Idle waits for
    work are not counted. `cpu_s` is the loop thread's own CPU time, idle or not: what the wall
    figures hold beyond it, the thread spent waiting for the GIL or a core.
    """

    steps: int = 0
    step_s: float = 0.0
    forward_s: float = 0.0
    calls_s: float = 0.0
    deliver_s: float = 0.0
    cpu_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def step(self, engine: Engine) -> list[RequestOutput]:
        """`engine.step()`, counted: its time, and its forward pass's when it ran one."""
        t0, last = time.perf_counter(), engine.last_step
        outputs = engine.step()
        self.steps += 1
        self.step_s += time.perf_counter() - t0
        if engine.last_step is not last and engine.last_step is not None:
            self.forward_s += engine.last_step.seconds
        return outputs


class EngineLoop:
    """Owns a `HandoffEngine` and the thread that steps it."""

    def __init__(self, engine: HandoffEngine):
        self.engine = engine
        self._calls: queue.Queue = queue.Queue()
        self._subscribers: dict[str, Callable[[RequestOutput], None]] = {}
        self._stop = threading.Event()
        self.finished: Counter[str] = Counter()  # requests ended, by finish reason
        self.timings = LoopTimings()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[HandoffEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the loop thread; the future holds its result or exception."""
        fut: Future[T] = Future()
        self._calls.put((fn, fut))
        return fut

    async def acall(self, fn: Callable[[HandoffEngine], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    def subscribe(self, request_id: str, sink: Callable[[RequestOutput], None]) -> None:
        """Route `request_id`'s outputs to `sink` (call this on the loop thread, via `call`)."""
        self._subscribers[request_id] = sink

    def stop(self) -> None:
        self._stop.set()
        self._calls.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        t = self.timings
        clock = time.perf_counter
        while not self._stop.is_set():
            # Idle: sleep until a call comes. Busy: take whatever calls are waiting, then step.
            block = not self.engine.has_unfinished()
            while True:
                try:
                    item = self._calls.get(block=block)
                except queue.Empty:
                    break
                if item is None:
                    return
                t0 = clock()
                self._apply(*item)
                t.calls_s += clock() - t0
                block = False
            # What the calls decided (an imported prompt's first token: the TTFT of every remote
            # prefill) goes out now, not one forward pass later.
            self._deliver(self.engine.take_pending())
            outputs = t.step(self.engine)
            t1 = clock()
            self._deliver(outputs)
            t.deliver_s += clock() - t1
            t.cpu_s = time.thread_time()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sink = self._subscribers.get(out.request_id)
            if out.finished:
                self._subscribers.pop(out.request_id, None)
                self.finished[out.finish_reason or "unknown"] += 1
            if sink is not None:
                sink(out)

    def _apply(self, fn: Callable[[HandoffEngine], object], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(self.engine))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)
