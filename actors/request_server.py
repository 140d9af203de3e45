"""A worker's request endpoint: the router streams requests to a decode worker here, and a
decode worker asks a prefill worker for a prompt's KV here, over gRPC, not Ray.

The server runs on the worker actor's own event loop (started by `Worker.request_endpoint`), so
a request's stream is the same coroutine as `Worker.stream`'s, and a prefill the same as
`Worker.prefill`'s; only the transport differs (see `router/worker_link.py` for the frames and
why). A call without the worker's token is refused before anything in it is read. A stream the
router cancels, or whose connection drops, is cancelled, and `Worker.generate` then frees the
request's blocks as it does for Ray. A prefill whose caller goes away runs on, as a Ray call
would: the decode worker's receiver refuses its KV, and the prompt's blocks free as it ends.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from baton.router.worker_link import (
    CHANNEL_OPTIONS,
    SERVICE,
    TOKEN_HEADER,
    error_frame,
    output_frame,
    raw_bytes,
)

log = logging.getLogger(__name__)

PREFILL_HANDLES_KEPT = 64

Generate = Callable[..., AsyncIterator[Any]]  # Worker.generate
Prefill = Callable[..., Awaitable[int]]  # Worker.prefill


class RequestServer:
    """grpc.aio server over `generate(request_id, prompt, params, prefill, caller)` (`Generate`,
    a stream) and `prefill(...)` (`Prefill`, unary: `Worker.prefill`'s arguments)."""

    def __init__(self, generate: Generate, prefill: Prefill, host: str):
        self._generate = generate
        self._run_prefill = prefill
        self.token = secrets.token_urlsafe(24)
        self._expected = self.token.encode()
        self._prefill: OrderedDict[bytes, Any] = OrderedDict()  # pickled handle -> handle
        self._server = grpc.aio.server(options=CHANNEL_OPTIONS)
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self._serve, request_deserializer=raw_bytes, response_serializer=raw_bytes),
            "Prefill": grpc.unary_unary_rpc_method_handler(
                self._serve_prefill, request_deserializer=raw_bytes,
                response_serializer=raw_bytes),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self._server.add_insecure_port(f"{host}:0")
        self.address = f"{host}:{self.port}"

    async def start(self) -> RequestServer:
        await self._server.start()
        log.info("request endpoint on %s", self.address)
        return self

    async def _check_token(self, context: grpc.aio.ServicerContext) -> None:
        token = next((v for k, v in context.invocation_metadata() or () if k == TOKEN_HEADER), "")
        if not hmac.compare_digest(str(token).encode(), self._expected):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "a worker's request endpoint takes the token it reports from "
                                "Worker.request_endpoint()")

    async def _serve(self, request: bytes, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[bytes]:
        await self._check_token(context)
        try:
            request_id, prompt, params, caller, prefill = pickle.loads(request)
            async for out in self._generate(request_id, prompt, params,
                                            self._prefill_handle(prefill), caller):
                yield output_frame(out)
        except Exception as exc:  # noqa: BLE001 - every failure reaches the router, typed
            yield error_frame(exc)

    async def _serve_prefill(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._check_token(context)
        try:
            task = asyncio.ensure_future(self._run_prefill(*pickle.loads(request)))
            task.add_done_callback(_log_unawaited)
            return output_frame(await asyncio.shield(task))  # the caller's cancel spares it
        except Exception as exc:  # noqa: BLE001 - the decode worker gets it, typed
            return error_frame(exc)

    def _prefill_handle(self, pickled: bytes | None) -> Any:
        """The prefill worker's actor handle the router sent (unpickled once per handle)."""
        if pickled is None:
            return None
        handle = self._prefill.get(pickled)
        if handle is None:
            handle = self._prefill[pickled] = pickle.loads(pickled)
            while len(self._prefill) > PREFILL_HANDLES_KEPT:
                self._prefill.popitem(last=False)
        return handle


def _log_unawaited(task: asyncio.Task[int]) -> None:
    """A prefill's end, for one whose caller stopped waiting (its exception is then read here)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("a prefill ended with %s: %s", type(exc).__name__, exc)
