"""One request's outputs, handed from the engine thread to the asyncio task that streams them.

The engine thread never waits here, and wakes the event loop only when the reader is parked on an
empty stream (one wakeup per step at most, none while the reader is still busy with the last
item). The reader takes every output that arrived since its last read as one `RequestOutput`
(`merge_outputs`), so a reader that falls behind the engine catches up in one stream item instead
of one item per token.
"""

from __future__ import annotations

import asyncio
import threading

from baton.outputs import RequestOutput, merge_outputs


class OutputStream:
    """A single-reader mailbox of one request's outputs; `put` from any thread, `get` on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[RequestOutput] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, out: RequestOutput) -> None:
        """Add an output (the engine thread calls this); wakes a parked reader."""
        with self._lock:
            self._ready.append(out)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    async def get(self) -> RequestOutput:
        """Everything put since the last `get`, merged; waits while nothing is there."""
        while True:
            with self._lock:
                if self._ready:
                    ready, self._ready = self._ready, []
                    return merge_outputs(ready)
                waiter = self._waiter = self._loop.create_future()
            await waiter


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # the reader may have been cancelled meanwhile
        waiter.set_result(None)
