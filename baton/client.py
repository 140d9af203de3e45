"""Python client for Baton's gRPC API, sync (`BatonClient`) and asyncio (`AsyncBatonClient`).

    with BatonClient("127.0.0.1:50051") as client:
        for chunk in client.generate("Why is the sky blue?", max_tokens=64):
            print(chunk.text, end="", flush=True)

Failures arrive as the `baton.errors` type of their status code (bad input as
`InvalidRequestError`, a full router as `CapacityError`, ...), with the server's message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from baton import errors
from baton.protos import baton_pb2 as pb
from baton.protos import baton_pb2_grpc as pb_grpc

_BY_STATUS: dict[grpc.StatusCode, type[errors.BatonError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: errors.ModelNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.CapacityError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineError,
    grpc.StatusCode.UNAVAILABLE: errors.WorkerUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthError,
    grpc.StatusCode.ABORTED: errors.KVTransferError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.ModelLoadError,
}


def error_from_rpc(exc: grpc.RpcError) -> errors.BatonError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return _BY_STATUS.get(code, errors.EngineError)(f"{details} [{code.name}]")


@dataclass(slots=True)
class SpecDecode:
    """How speculative decoding served a request (on the last chunk)."""

    method: str
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: list[int]
    num_forward_passes: int

    @property
    def acceptance_rate(self) -> float | None:
        return (self.num_accepted_tokens / self.num_draft_tokens
                if self.num_draft_tokens else None)


@dataclass(slots=True)
class Chunk:
    """What one streamed message brings: text and token ids new since the last one."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    path: str = ""  # first chunk only: "local" or "disaggregated"
    kv_bytes: int = 0  # last chunk only: KV bytes pushed from a prefill worker
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)
    spec_decode: SpecDecode | None = None  # last chunk only


@dataclass(slots=True)
class Completion:
    """A whole generation, as `complete` gathers it."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    path: str
    kv_bytes: int
    spec_decode: SpecDecode | None = None


def build_request(prompt: str | Sequence[int] | Sequence[dict[str, str]], *,
                  request_id: str = "", model: str = "", **sampling: Any) -> pb.GenerateRequest:
    """A `GenerateRequest`: `prompt` is text, token ids, or chat messages ({role, content})."""
    req = pb.GenerateRequest(request_id=request_id, model=model)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"])
                                 for m in prompt if isinstance(m, dict))
    else:
        ids = list(prompt)
        if not all(isinstance(t, int) and 0 <= t < 2**32 for t in ids):
            raise errors.InvalidRequestError("token ids must be non-negative integers")
        req.token_ids.ids.extend(ids)
    for key, value in sampling.items():
        if value is None:
            continue
        if key in ("stop", "stop_token_ids"):
            getattr(req.sampling, key).extend([value] if isinstance(value, str) else value)
        else:
            setattr(req.sampling, key, value)
    return req


def _chunk(msg: pb.GenerateResponse) -> Chunk:
    spec = None
    if msg.usage.HasField("spec_decode"):
        s = msg.usage.spec_decode
        spec = SpecDecode(s.method, s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens,
                          list(s.accepted_per_pos), s.num_forward_passes)
    return Chunk(request_id=msg.request_id, text=msg.text, token_ids=list(msg.token_ids),
                 finish_reason=msg.finish_reason or None, prompt_tokens=msg.usage.prompt_tokens,
                 completion_tokens=msg.usage.completion_tokens, path=msg.path,
                 kv_bytes=msg.kv_bytes,
                 logprobs=[(lp.token_id, lp.logprob, dict(lp.top)) for lp in msg.logprobs],
                 spec_decode=spec)


def _gather(chunks: list[Chunk]) -> Completion:
    last = chunks[-1]
    return Completion(request_id=last.request_id, text="".join(c.text for c in chunks),
                      token_ids=[t for c in chunks for t in c.token_ids],
                      finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                      completion_tokens=last.completion_tokens, path=chunks[0].path,
                      kv_bytes=last.kv_bytes, spec_decode=last.spec_decode)


def _channel_args(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


class BatonClient:
    """Blocking client; one channel, safe to share between threads."""

    def __init__(self, address: str = "127.0.0.1:50051", *, token: str | None = None,
                 root_certificates: bytes | None = None):
        self._channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(
            root_certificates)) if root_certificates else grpc.insecure_channel(address))
        self._stub = pb_grpc.BatonStub(self._channel)
        self._metadata = _channel_args(token)

    def generate(self, prompt: Any, *, timeout_s: float | None = None,
                 **kw: Any) -> Iterator[Chunk]:
        """Stream a generation; keyword arguments are `SamplingParams` fields, `request_id`,
        `model`. Closing the iterator early cancels the request (its worker frees it)."""
        call = self._stub.Generate(build_request(prompt, **kw), timeout=timeout_s,
                                   metadata=self._metadata)
        try:
            for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    def complete(self, prompt: Any, **kw: Any) -> Completion:
        return _gather(list(self.generate(prompt, **kw)))

    def abort(self, request_id: str) -> bool:
        return self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id)).aborted

    def models(self) -> list[str]:
        return [m.id for m in self._unary(self._stub.ListModels, pb.ListModelsRequest()).models]

    def server_info(self) -> pb.GetServerInfoResponse:
        return self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest())

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=30)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BatonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncBatonClient:
    """asyncio client; use from one event loop."""

    def __init__(self, address: str = "127.0.0.1:50051", *, token: str | None = None,
                 root_certificates: bytes | None = None):
        self._channel = (grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(
            root_certificates)) if root_certificates else grpc.aio.insecure_channel(address))
        self._stub = pb_grpc.BatonStub(self._channel)
        self._metadata = _channel_args(token)

    async def generate(self, prompt: Any, *, timeout_s: float | None = None,
                       **kw: Any) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(build_request(prompt, **kw), timeout=timeout_s,
                                   metadata=self._metadata)
        try:
            async for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def complete(self, prompt: Any, **kw: Any) -> Completion:
        return _gather([c async for c in self.generate(prompt, **kw)])

    async def abort(self, request_id: str) -> bool:
        try:
            resp = await self._stub.Abort(pb.AbortRequest(request_id=request_id),
                                          metadata=self._metadata, timeout=30)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return resp.aborted

    async def models(self) -> list[str]:
        try:
            resp = await self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata,
                                               timeout=30)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return [m.id for m in resp.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncBatonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AdminClient:
    """The operator side of a router (what `baton status`, `drain` and `scale` call)."""

    def __init__(self, address: str = "127.0.0.1:50051", *, token: str | None = None,
                 timeout_s: float = 60.0):
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.AdminStub(self._channel)
        self._metadata = _channel_args(token)
        self._timeout_s = timeout_s

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def status(self) -> pb.ClusterStatusResponse:
        return self._call(self._stub.ClusterStatus, pb.ClusterStatusRequest())

    def drain(self, worker_id: str) -> int:
        return self._call(self._stub.DrainWorker,
                          pb.DrainWorkerRequest(worker_id=worker_id)).in_flight

    def scale(self, pool: str, replicas: int) -> int:
        return self._call(self._stub.ScalePool,
                          pb.ScalePoolRequest(pool=pool, replicas=replicas)).replicas

    def router_stats(self) -> dict[str, float]:
        return dict(self._call(self._stub.RouterStats, pb.RouterStatsRequest()).stats)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
