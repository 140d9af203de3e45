"""The engine loop hands out what a call decided before it runs the next forward pass."""

from __future__ import annotations

import threading

from baton.actors.engine_loop import EngineLoop
from baton.actors.handoff import HandoffEngine
from baton.sampling import SamplingParams


def test_an_imported_prompts_first_token_goes_out_before_the_next_forward_pass() -> None:
    """A remote prefill's first token reaches its reader as soon as the import completes: its TTFT
    does not wait for the decode worker's next step."""
    loop = EngineLoop(HandoffEngine("tiny:llama", dtype="float32"))
    try:
        seen: list[tuple[list[int], int]] = []
        done = threading.Event()

        def sink(out) -> None:
            seen.append((list(out.token_ids), loop.timings.steps))
            if out.finished:
                done.set()

        def reserve(e: HandoffEngine) -> None:
            e.reserve_import(list(range(3, 40)), SamplingParams(max_tokens=3, ignore_eos=True),
                             "imported")
            loop.subscribe("imported", sink)

        loop.call(reserve).result(10)

        def complete(e: HandoffEngine) -> int:
            e.complete_import("imported", 7)
            return loop.timings.steps

        steps_then = loop.call(complete).result(10)
        assert done.wait(30)
        assert seen[0] == ([7], steps_then)  # out with no forward pass in between
        assert len(seen[-1][0]) == 3  # then it decodes on as usual
    finally:
        loop.stop()
