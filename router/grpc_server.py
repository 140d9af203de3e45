"""The client-facing gRPC server: `baton.v1.Baton`, `baton.v1.Admin`, health and reflection.

Every failure reaches the client as one status code with a message that says what to change
(`BatonError.grpc_status`). A client that cancels, or whose deadline passes, has its request
aborted in the workers. With a token configured, every call but the health check must carry
`authorization: Bearer <token>`; TLS is an option of `serve`.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton import __version__
from baton.errors import BatonError, ConfigError, InvalidRequestError, as_baton_error
from baton.outputs import RequestMetrics
from baton.protos import baton_pb2 as pb
from baton.protos import baton_pb2_grpc as pb_grpc
from baton.router.core import Router
from baton.sampling import SamplingParams
from baton.speculation import AUTO

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """`SamplingParams` from the wire; unset fields keep Baton's defaults (validated here)."""
    kw: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs",
                 "num_speculative_tokens"):
        if msg.HasField(name):
            kw[name] = getattr(msg, name)
    if kw.get("top_k") == -1:
        kw["top_k"] = 0
    return SamplingParams(stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids),
                          ignore_eos=msg.ignore_eos, method=msg.method or AUTO,
                          allow_lossy=msg.allow_lossy,
                          disable_exploration=msg.disable_exploration, **kw)


def spec_stats_to_proto(m: RequestMetrics, out: pb.SpecDecodeStats) -> None:
    """Fill a last chunk's speculative-decoding counters from a request's metrics."""
    out.method = m.method
    out.num_drafts = m.spec_num_drafts
    out.num_draft_tokens = m.spec_draft_tokens
    out.num_accepted_tokens = m.spec_accepted_tokens
    out.accepted_per_pos.extend(m.spec_accepted_per_pos)
    out.num_forward_passes = m.num_forward_passes


def prompt_from_proto(req: pb.GenerateRequest) -> Any:
    kind = req.WhichOneof("prompt")
    if kind == "text":
        return req.text
    if kind == "token_ids":
        return list(req.token_ids.ids)
    if kind == "chat":
        return [{"role": m.role, "content": m.content} for m in req.chat.messages]
    raise InvalidRequestError("GenerateRequest needs a prompt: set text, token_ids or chat")


async def _fail(context: grpc.aio.ServicerContext, exc: BatonError) -> None:
    err = as_baton_error(exc) or exc  # one raised in a worker arrives wrapped by Ray
    await context.abort(getattr(grpc.StatusCode, err.grpc_status), str(err.args[0]))


class BatonService(pb_grpc.BatonServicer):
    def __init__(self, router: Router):
        self.router = router

    async def Generate(self, request: pb.GenerateRequest,  # noqa: N802 - gRPC method name
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        received = time.perf_counter()
        try:
            params = sampling_from_proto(request.sampling)
            remaining = context.time_remaining()
            stream = self.router.generate(prompt_from_proto(request), params,
                                          request_id=request.request_id or None,
                                          model=request.model or None, timeout_s=remaining,
                                          received_at=received)
            sent = 0
            async for out in stream:
                chunk = pb.GenerateResponse(request_id=out.request_id, text=out.delta_text,
                                            token_ids=out.delta_token_ids)
                if sent == 0:
                    chunk.path = out.metrics.prefill_path
                if out.logprobs:
                    for lp in out.logprobs[sent: len(out.token_ids)]:
                        chunk.logprobs.add(token_id=lp.token_id, logprob=lp.logprob, top=lp.top)
                sent = len(out.token_ids)
                if out.finished:
                    chunk.finish_reason = out.finish_reason or ""
                    chunk.usage.prompt_tokens = out.metrics.num_prompt_tokens
                    chunk.usage.completion_tokens = len(out.token_ids)
                    spec_stats_to_proto(out.metrics, chunk.usage.spec_decode)
                    chunk.kv_bytes = out.metrics.kv_bytes_received
                    if out.finish_reason == "error":
                        await context.abort(grpc.StatusCode.INTERNAL,
                                            f"request failed in its worker: {out.error}")
                yield chunk
        except BatonError as exc:
            await _fail(context, exc)

    async def Abort(self, request: pb.AbortRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(aborted=await self.router.abort(request.request_id))

    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        m = self.router.model
        return pb.ListModelsResponse(models=[pb.ModelCard(id=m.name,
                                                          max_model_len=m.max_model_len)])

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        r = self.router
        return pb.GetServerInfoResponse(
            version=__version__, router_id=r.router_id, models=[r.model.name],
            decode_workers=len(r.dispatcher.decode), prefill_workers=len(r.dispatcher.prefill),
            state_available=bool(r.state is not None and r.state.available))


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (health checks stay open)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong token: send metadata "
                                "'authorization: Bearer <token>' (see `baton up` output)")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(HEALTH_METHOD_PREFIX):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get(AUTH_HEADER, "")
        given_b = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_b, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary


async def serve(router: Router, host: str = "127.0.0.1", port: int = 50051, *,
                admin: pb_grpc.AdminServicer | None = None, token: str | None = None,
                tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the server on `host:port` (0: any free port); returns it and the bound port.

    `tls` is (private key PEM, certificate chain PEM). Binding beyond loopback without a token
    is refused: the API would be open to the network.
    """
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise ConfigError(f"binding the API to {host} needs a token (auth); set one, or bind "
                          "127.0.0.1")
    server = grpc.aio.server(interceptors=[TokenAuth(token)] if token else None,
                             options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_BatonServicer_to_server(BatonService(router), server)
    names = [pb.DESCRIPTOR.services_by_name["Baton"].full_name]
    if admin is not None:
        pb_grpc.add_AdminServicer_to_server(admin, server)
        names.append(pb.DESCRIPTOR.services_by_name["Admin"].full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    if tls is not None:
        creds = grpc.ssl_server_credentials([tls])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise ConfigError(f"cannot bind the gRPC API to {address}: port in use? pick another")
    await server.start()
    for name in ("", *names[:1]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC API on %s (%s)", f"{host}:{bound}", "token auth" if token else "no auth")
    return server, bound
