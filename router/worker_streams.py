"""A request's stream from its decode worker, over either transport the dispatcher uses.

Over Ray: `Worker.stream`, a Ray streaming call with the request pickled into one argument.
Over the worker's request link: a gRPC stream of frames (`worker_link.py`). Either way the
dispatcher reads raw chunks (so it can time their arrival), unpacks each into an output, and
cancels the stream when its caller leaves.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import AsyncIterator
from typing import Any, Protocol

import ray
from ray.exceptions import GetTimeoutError

from baton.outputs import RequestOutput
from baton.sampling import SamplingParams


class _ReadyGetIsNotBlocking(logging.Filter):
    """Ray warns of any `ray.get` in an async actor; `_take`'s never waits (timeout 0)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using blocking ray.get inside async actor")


logging.getLogger("ray._private.worker").addFilter(_ReadyGetIsNotBlocking())


async def _take(ref: Any) -> Any:
    """A streamed chunk's value: read in place when it is already here (a streamed small object
    is, as its ref arrives), which spares `await ref`'s hop through Ray's thread and back."""
    try:
        return ray.get(ref, timeout=0)
    except GetTimeoutError:
        return await ref


def open_stream(worker: Any, request_id: str, prompt: str | list[int], params: SamplingParams,
                prefill: Any = None, caller: str | None = None) -> Any:
    """Start `request_id` on `worker` (`Worker.stream`, its arguments but the prefill handle
    pickled into one); the refs it yields hold pickled outputs (`unpack_output`)."""
    packed = pickle.dumps((request_id, prompt, params, caller), protocol=pickle.HIGHEST_PROTOCOL)
    return worker.stream.options(num_returns="streaming").remote(packed, prefill)


async def unpack_output(ref: Any) -> RequestOutput:
    """One output of a `Worker.stream`."""
    return pickle.loads(await _take(ref))



class Source(Protocol):
    """One request's stream from its worker: `RaySource`, or the link's `RequestStream`."""

    def chunks(self) -> AsyncIterator[Any]: ...

    async def unpack(self, chunk: Any) -> RequestOutput: ...

    def cancel(self) -> None: ...


class RaySource:
    """`Worker.stream` over Ray (`open_stream`)."""

    def __init__(self, stream: Any):
        self._stream = stream

    def chunks(self) -> AsyncIterator[Any]:
        return self._stream.__aiter__()

    async def unpack(self, chunk: Any) -> RequestOutput:
        return await unpack_output(chunk)

    def cancel(self) -> None:
        ray.cancel(self._stream)
