"""Requests streamed from the router to a decode worker over gRPC, with Ray off the request path.

A worker serves one unary-stream method (`actors/request_server.py`) on the address it reports
from `Worker.request_endpoint()`, asked over Ray once per worker. A call carries the request as
`Worker.stream` takes it (pickled: request id, prompt, sampling params, caller) plus the prefill
worker's actor handle, pickled out of band; the worker answers with frames: an output, or the
error the request ended with, pickled. The worker's per-process token rides in every call's
metadata, and the worker reads nothing before it checks it; only a process that can call the
worker over Ray learns the token.

Why: a Ray streaming call costs the router about 0.4 ms to submit and 2.5 ms from call to first
item (one process to another on this machine's 2 cores), a grpc.aio stream about 0.13 and 1.2 ms.
The router still uses Ray for everything else (renewals, aborts, the endpoint itself), and falls
back to `Worker.stream` over Ray for a worker whose link fails before its first output
(`LinkLost`): a dead worker then shows itself as Ray reports it.

A decode worker calls its prefill worker the same way: the endpoint's unary `Prefill` method
takes `Worker.prefill`'s arguments, pickled, and answers with a frame holding the first token
(or the error). A failed call fails that handoff (the decode worker prefills the prompt itself)
and sends that prefill worker's later handoffs over Ray.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from baton.errors import EngineError
from baton.outputs import RequestOutput
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

SERVICE = "baton.worker.v1.Requests"
METHOD = f"/{SERVICE}/Generate"
PREFILL_METHOD = f"/{SERVICE}/Prefill"
TOKEN_HEADER = "x-baton-worker-token"
OUTPUT = b"o"  # a frame holding a pickled result: a RequestOutput, or a prefill's first token
ERROR = b"e"  # a frame holding the pickled exception the request ended with
# Outputs are cumulative (a long answer's last one holds all its tokens and logprobs).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class LinkLost(Exception):  # noqa: N818 - a signal between dispatcher and link, not an error kind
    """The gRPC stream to a worker failed (refused, reset, unreachable): not the request's fault."""


def raw_bytes(data: bytes) -> bytes:
    """gRPC's (de)serializer for a method of raw bytes, on both ends."""
    return data


def pack_request(request_id: str, prompt: str | list[int], params: SamplingParams,
                 caller: str | None, prefill: bytes | None) -> bytes:
    return pickle.dumps((request_id, prompt, params, caller, prefill),
                        protocol=pickle.HIGHEST_PROTOCOL)


def output_frame(out: Any) -> bytes:
    return OUTPUT + pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)


def error_frame(exc: BaseException) -> bytes:
    """The exception a request ended with, as the router will raise it: itself when it pickles
    (every `BatonError` does), else an `EngineError` that names it."""
    try:
        return ERROR + pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - whatever it was, the caller gets a typed error
        err = EngineError(f"the worker failed the request: {type(exc).__name__}: {exc}")
        return ERROR + pickle.dumps(err, protocol=pickle.HIGHEST_PROTOCOL)


def read_frame(frame: bytes) -> Any:
    """A frame's result; raises the error it carries."""
    kind, body = frame[:1], frame[1:]
    if kind == OUTPUT:
        return pickle.loads(body)
    if kind == ERROR:
        raise pickle.loads(body)
    raise LinkLost(f"a worker sent a frame of unknown kind {kind!r}")


@dataclass(slots=True)
class Endpoint:
    """One worker's request address and token, and the channel to it (of the loop that made it:
    a channel serves one event loop)."""

    address: str
    token: str
    _channel: grpc.aio.Channel | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _call: Any = None
    _prefill: Any = None

    def call(self) -> Any:
        """The `Generate` stream's callable, on this loop's channel."""
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._loop = loop
            self._call = self._channel.unary_stream(METHOD, request_serializer=raw_bytes,
                                                    response_deserializer=raw_bytes)
            self._prefill = self._channel.unary_unary(PREFILL_METHOD, request_serializer=raw_bytes,
                                                      response_deserializer=raw_bytes)
        return self._call

    async def prefill(self, *args: Any) -> int:
        """`Worker.prefill(*args)` on this (prefill) worker: the prompt's first token, or the
        error the prefill raised; `LinkLost` when the call itself fails."""
        self.call()
        packed = pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            frame = await self._prefill(packed, metadata=((TOKEN_HEADER, self.token),))
        except grpc.aio.AioRpcError as exc:
            raise LinkLost(f"{exc.code().name}: {exc.details()}") from exc
        first: int = read_frame(frame)
        return first

    async def close(self) -> None:
        if self._channel is not None and self._loop is asyncio.get_running_loop():
            await self._channel.close()
        self._channel = self._call = self._prefill = self._loop = None


class RequestStream:
    """One request streaming from a worker over its link (a `worker_streams.Source`): `chunks()`
    yields raw frames (so a caller can time their arrival), `unpack` turns each into an
    output."""

    def __init__(self, endpoint: Endpoint, packed: bytes):
        self._call = endpoint.call()(packed, metadata=((TOKEN_HEADER, endpoint.token),))

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for frame in self._call:
                yield frame
        except grpc.aio.AioRpcError as exc:
            raise LinkLost(f"{exc.code().name}: {exc.details()}") from exc

    async def unpack(self, frame: bytes) -> RequestOutput:
        out: RequestOutput = read_frame(frame)
        return out

    def cancel(self) -> None:
        self._call.cancel()


@dataclass(slots=True)
class WorkerLinks:
    """Request links, one per worker (the dispatcher's to decode workers, a decode worker's to
    prefill workers): learnt on first use, dropped with the worker, or given up for Ray after a
    failure."""

    role: str = "decode worker"  # whom the links reach, for the logs
    _ends: dict[Any, Endpoint | None] = field(default_factory=dict)  # None: Ray for this one
    _pickled: dict[Any, bytes] = field(default_factory=dict)  # prefill handle -> its pickle

    async def endpoint(self, worker: Any) -> Endpoint | None:
        if worker in self._ends:
            return self._ends[worker]
        try:
            address, token = await worker.request_endpoint.remote()
        except Exception as exc:  # noqa: BLE001 - a worker without a link still serves over Ray
            log.warning("no request link to a %s (%s); calling it over Ray", self.role, exc)
            end = None
        else:
            end = Endpoint(address, token)
        self._ends[worker] = end
        return end

    def pickled(self, prefill: Any) -> bytes | None:
        """A prefill worker's handle as the decode worker unpickles it (made once per handle)."""
        if prefill is None:
            return None
        blob = self._pickled.get(prefill)
        if blob is None:
            blob = self._pickled[prefill] = pickle.dumps(prefill)
        return blob

    def give_up(self, worker: Any, why: BaseException) -> None:
        """Call `worker` over Ray from now on."""
        end = self._ends.get(worker)
        log.warning("the request link to %s %s failed (%s); calling it over Ray from now on",
                    self.role, end.address if end else "?", why)
        self._ends[worker] = None
        if end is not None:
            self._close_later(end)

    def keep_only(self, workers: set[Any]) -> None:
        """Forget the links (and pickles) of workers no longer in the cluster."""
        for worker in [w for w in self._ends if w not in workers]:
            end = self._ends.pop(worker)
            if end is not None:
                self._close_later(end)
        for handle in [h for h in self._pickled if h not in workers]:
            del self._pickled[handle]

    @staticmethod
    def _close_later(end: Endpoint) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the channel goes with its own
        if end._loop is loop:
            loop.create_task(end.close())
