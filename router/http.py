"""The OpenAI-compatible HTTP front end of the router (aiohttp).

`/v1/completions`, `/v1/chat/completions` (both streaming as server-sent events), `/v1/models`,
`/health` (200 while the router has a decode worker, 503 otherwise) and `/metrics` (Prometheus
text). Failures answer with OpenAI's error body and the HTTP status of the `BatonError`'s gRPC
status. A client that disconnects mid-stream has its request aborted in its worker: the handler
is cancelled or its write fails, and closing the router's stream aborts the request. With a token
set, every path but `/health` needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from baton.errors import BatonError, ConfigError, InvalidRequestError, as_baton_error
from baton.outputs import RequestOutput
from baton.router import openai_api as oa
from baton.router.core import Router
from baton.router.metrics import CONTENT_TYPE, RouterMetrics

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = ("/health",)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status)


def _error(exc: BaseException) -> web.Response:
    err = as_baton_error(exc)
    if err is None:
        log.error("request failed unexpectedly", exc_info=exc)
        return _json(500, oa.error_body(500, f"internal error: {type(exc).__name__}; see the "
                                        "router's log"))
    return _json(*oa.http_error(err))


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _json(401, oa.error_body(401, "missing or wrong token: send the header "
                                            "'Authorization: Bearer <token>' (the API key)",
                                            "invalid_api_key"))
        return await handler(request)

    return check


class OpenAIFrontEnd:
    """Request handlers over one `Router`."""

    def __init__(self, router: Router, metrics: RouterMetrics):
        self.router = router
        self.metrics = metrics

    # -- simple endpoints -------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        decode = len(self.router.dispatcher.decode)
        body = {"status": "ok" if decode else "unavailable", "decode_workers": decode,
                "prefill_workers": len(self.router.dispatcher.prefill)}
        return _json(200 if decode else 503, body)

    async def models(self, request: web.Request) -> web.Response:
        m = self.router.model
        card = {"id": m.name, "object": "model", "created": 0, "owned_by": "baton",
                "max_model_len": m.max_model_len}
        return _json(200, {"object": "list", "data": [card]})

    async def metrics_text(self, request: web.Request) -> web.Response:
        await self.metrics.poll_workers(self.router.dispatcher.workers())
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- generation -------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        received = time.perf_counter()
        try:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidRequestError(f"the request body is not valid JSON ({exc})") from exc
            if not isinstance(body, dict):
                raise InvalidRequestError("the request body must be a JSON object")
            req = oa.parse_chat(body) if chat else oa.parse_completion(body)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            stream = self.router.generate(req.prompt, req.params, request_id=rid,
                                          model=req.model, received_at=received)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP error
            # Refused before the router saw it (body, fields): counted here, not by the router.
            self.metrics.failed("", type(as_baton_error(exc) or exc).__name__)
            return _error(exc)
        # Closing the stream (on return, on a failed write, on cancellation when the client
        # leaves) aborts the request in its worker.
        async with contextlib.aclosing(stream):
            try:
                first = await anext(stream)
            except Exception as exc:  # noqa: BLE001 - refused before anything was sent
                return _error(exc)
            if req.stream:
                return await self._stream(request, rid, req, chat, first, stream)
            return await self._whole(rid, req, chat, first, stream)

    async def _whole(self, rid: str, req: oa.ParsedRequest, chat: bool, first: RequestOutput,
                     stream: AsyncIterator[RequestOutput]) -> web.Response:
        last = first
        try:
            async for out in stream:
                last = out
        except Exception as exc:  # noqa: BLE001
            return _error(exc)
        if last.finish_reason == "error":
            return _json(500, oa.error_body(500, f"request failed in its worker: {last.error}"))
        tok = self.router.model.tokenizer
        lps = last.logprobs or []
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": last.text}
            choice["logprobs"] = oa.chat_logprobs(tok, lps) if req.logprobs else None
            kind = "chat.completion"
        else:
            choice["text"] = last.text
            choice["logprobs"] = oa.completion_logprobs(tok, lps, 0) if req.logprobs else None
            kind = "text_completion"
        body = oa.envelope(kind, rid, self.router.model.name, [choice])
        body["usage"] = oa.usage(last)
        return _json(200, body)

    async def _stream(self, request: web.Request, rid: str, req: oa.ParsedRequest, chat: bool,
                      first: RequestOutput, stream: AsyncIterator[RequestOutput]
                      ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"
        model, tok = self.router.model.name, self.router.model.tokenizer
        created = oa.envelope(kind, rid, model, [])["created"]

        def chunk(choices: list[dict[str, Any]]) -> bytes:
            body = oa.envelope(kind, rid, model, choices, created)
            if req.include_usage:
                body["usage"] = None
            return _sse(body)

        if chat:
            await resp.write(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]))
        sent, text_len, last = 0, 0, first
        try:
            out: RequestOutput | None = first
            while out is not None:
                last = out
                if out.finish_reason == "error":
                    raise BatonError(f"request failed in its worker: {out.error}")
                new = (out.logprobs or [])[sent:len(out.token_ids)]
                choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason}
                if chat:
                    choice["delta"] = {"content": out.delta_text} if out.delta_text else {}
                    choice["logprobs"] = oa.chat_logprobs(tok, new) if req.logprobs else None
                else:
                    choice["text"] = out.delta_text
                    choice["logprobs"] = (oa.completion_logprobs(tok, new, text_len)
                                          if req.logprobs else None)
                if out.delta_text or out.finished or new:
                    await resp.write(chunk([choice]))
                sent, text_len = len(out.token_ids), text_len + len(out.delta_text)
                out = await anext(stream, None)
        except (ConnectionResetError, OSError):
            log.info("client of %s left mid-stream; aborting it", rid)
            return resp
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in the stream
            err = as_baton_error(exc) or exc
            status = oa.HTTP_STATUS.get(getattr(err, "grpc_status", ""), 500)
            with contextlib.suppress(ConnectionResetError, OSError):
                await resp.write(_sse(oa.error_body(status, str(err))))
                await resp.write(_sse("[DONE]"))
            return resp
        if req.include_usage:
            usage_chunk = oa.envelope(kind, rid, model, [], created)
            usage_chunk["usage"] = oa.usage(last)
            await resp.write(_sse(usage_chunk))
        await resp.write(_sse("[DONE]"))
        await resp.write_eof()
        return resp


def build_app(router: Router, token: str | None = None) -> web.Application:
    """The aiohttp application over `router` (its metrics attached as its observer)."""
    front = OpenAIFrontEnd(router, RouterMetrics.attach(router))
    app = web.Application(middlewares=[auth_middleware(token)] if token else [],
                          client_max_size=16 * 1024 * 1024)
    app.add_routes([
        web.post("/v1/completions", front.completions),
        web.post("/v1/chat/completions", front.chat_completions),
        web.get("/v1/models", front.models),
        web.get("/health", front.health),
        web.get("/metrics", front.metrics_text),
    ])
    return app


async def serve_http(router: Router, host: str, port: int, token: str | None = None
                     ) -> tuple[web.AppRunner, int]:
    """Start the HTTP front end on `host:port` (0: any free port); returns the runner and the
    bound port. Binding beyond loopback without a token is refused."""
    if host not in LOOPBACK and not token:
        raise ConfigError(f"binding the HTTP API to {host} needs a token (auth); set one, or "
                          "bind 127.0.0.1")
    # handler_cancellation: a client that leaves while its request waits for a token cancels
    # the handler, which aborts the request.
    runner = web.AppRunner(build_app(router, token), handler_cancellation=True,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot bind the HTTP API to {host}:{port} ({exc}); pick another "
                          "port") from exc
    bound = int(runner.addresses[0][1])
    log.info("HTTP API on %s:%d (%s)", host, bound, "token auth" if token else "no auth")
    return runner, bound
