"""The router's core, behind both its gRPC and its HTTP front end.

Per request: validate and encode the prompt (text, token ids or chat messages) against the served
model, refuse what can never run before any worker sees it, admit it under a bound on requests in
flight (over it: `CapacityError`, RESOURCE_EXHAUSTED, rather than latency without end), stream it
through the dispatcher within its deadline, and account for it: the journal and the performance
history in Redis (when there is one) and the router's own recent TTFT/TPOT window. The router keeps
no state a restart would lose beyond its streams in flight.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from baton.errors import (
    BatonError,
    CapacityError,
    DeadlineError,
    InvalidRequestError,
    ModelNotFoundError,
    as_baton_error,
)
from baton.outputs import RequestOutput
from baton.prompts import chat_prompt, check_context, encode_prompt
from baton.records import PerfRecord, RouterState
from baton.router.dispatch import Dispatcher
from baton.sampling import SamplingParams
from baton.stats import percentile, tpot

log = logging.getLogger(__name__)

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


@dataclass(slots=True)
class RouterLimits:
    """Bounds that keep one router's latency finite under overload."""

    max_in_flight: int = 256  # requests streaming at once; the next one gets RESOURCE_EXHAUSTED
    max_request_id_len: int = 256
    recent_window: int = 1024  # requests behind the TTFT/TPOT percentiles in `stats()`


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the router needs to know of the model its workers serve."""

    name: str
    tokenizer: Any
    vocab_size: int
    max_model_len: int


class RequestObserver(Protocol):
    """Told by the router of each request's life (metrics); calls are cheap and run inline.

    `failed` also hears of requests refused before admission (reason: the error's type name).
    """

    def accepted(self, request_id: str, prompt_tokens: int) -> None: ...

    def first_token(self, request_id: str, ttft_s: float) -> None: ...

    def finished(self, request_id: str, last: RequestOutput | None, tpot_s: float | None,
                 e2e_s: float) -> None: ...

    def failed(self, request_id: str, reason: str) -> None: ...


class Router:
    """Validates, admits, dispatches and accounts for requests; one per front-end process.

    `state` is the cluster's shared state (None without Redis); `refresh` returns the current
    (decode, prefill) worker handles, called every `refresh_s` (None: a fixed set);
    `observer` hears of every request (see `RequestObserver`).
    """

    def __init__(self, model: ServedModel, dispatcher: Dispatcher, *,
                 state: RouterState | None = None, router_id: str | None = None,
                 limits: RouterLimits | None = None,
                 refresh: Callable[[], Any] | None = None, refresh_s: float = 1.0,
                 observer: RequestObserver | None = None):
        self.model = model
        self.dispatcher = dispatcher
        self.state = state
        self.router_id = router_id or f"router-{uuid.uuid4().hex[:8]}"
        self.limits = limits or RouterLimits()
        self.observer = observer
        self.in_flight = 0
        self.counters: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, float | None]] = collections.deque(
            maxlen=self.limits.recent_window)
        self._refresh = refresh
        self._refresh_s = refresh_s
        self._refresher: asyncio.Task | None = None

    # -- requests ---------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text, token-id or chat prompt; raises `InvalidRequestError`."""
        m = self.model
        if isinstance(prompt, list | tuple) and prompt and isinstance(prompt[0], dict):
            text = chat_prompt(m.tokenizer, m.name, prompt)
            return list(m.tokenizer.encode(text, add_special_tokens=False))
        return encode_prompt(m.tokenizer, m.vocab_size, prompt)  # type: ignore[arg-type]

    def check_model(self, name: str | None) -> None:
        if name and name != self.model.name:
            raise ModelNotFoundError(f"model {name!r} is not served here; this router serves "
                                     f"{self.model.name!r} (see ListModels)")

    async def generate(self, prompt: Prompt, params: SamplingParams, *,
                       request_id: str | None = None, model: str | None = None,
                       timeout_s: float | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; every failure is a `BatonError` with its gRPC status."""
        try:
            request_id = self._request_id(request_id)
            self.check_model(model)
            ids = self.encode(prompt)
            check_context(len(ids), params.max_tokens, self.model.max_model_len)
            if self.in_flight >= self.limits.max_in_flight:
                self.counters["rejected_capacity"] += 1
                raise CapacityError(f"router {self.router_id} has {self.in_flight} requests in "
                                    f"flight (limit {self.limits.max_in_flight}); retry with "
                                    "backoff")
        except BatonError as exc:
            self._notify("failed", request_id or "", type(exc).__name__)
            raise
        self.in_flight += 1
        self.counters["accepted"] += 1
        self._notify("accepted", request_id, len(ids))
        started = time.monotonic()
        self._journal("accepted", request_id, prompt_tokens=len(ids),
                      max_tokens=params.max_tokens)
        last: RequestOutput | None = None
        first_at: float | None = None
        try:
            async with asyncio.timeout(timeout_s):
                async for out in self.dispatcher.generate(request_id, ids, params):
                    if first_at is None and out.token_ids:
                        first_at = time.monotonic()
                        self._notify("first_token", request_id, first_at - started)
                    last = out
                    yield out
        except TimeoutError as exc:
            self._failed(request_id, "deadline")
            raise DeadlineError(f"request {request_id} did not finish within its deadline of "
                                f"{timeout_s:.3g} s; allow more time or ask for fewer "
                                "tokens") from exc
        except Exception as exc:  # one raised in a worker arrives wrapped by Ray
            self._failed(request_id, type(as_baton_error(exc) or exc).__name__)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            self._failed(request_id, "cancelled")
            raise
        finally:
            self.in_flight -= 1
        try:
            self._finished(request_id, ids, params, last, started, first_at)
        except Exception:  # noqa: BLE001 - accounting never fails a request that was served
            log.exception("could not account for request %s", request_id)

    async def abort(self, request_id: str) -> bool:
        self.counters["abort_calls"] += 1
        return await self.dispatcher.abort(request_id)

    def _request_id(self, request_id: str | None) -> str:
        if not request_id:
            return uuid.uuid4().hex
        if len(request_id) > self.limits.max_request_id_len or not request_id.isprintable():
            raise InvalidRequestError(
                f"request_id must be printable and at most {self.limits.max_request_id_len} "
                "characters; leave it empty to get one")
        return request_id

    # -- accounting -------------------------------------------------------------------------------

    def _journal(self, event: str, request_id: str, **detail: Any) -> None:
        if self.state is not None:
            getattr(self.state, event)(request_id, router=self.router_id, **detail)

    def _notify(self, event: str, *args: Any) -> None:
        if self.observer is not None:
            try:
                getattr(self.observer, event)(*args)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                log.exception("request observer failed on %s", event)

    def _failed(self, request_id: str, reason: str) -> None:
        self.counters[f"failed_{reason}"] += 1
        self._notify("failed", request_id, reason)
        if self.state is not None:
            self.state.failed(request_id, reason, router=self.router_id)

    def _finished(self, request_id: str, ids: list[int], params: SamplingParams,
                  last: RequestOutput | None, started: float, first_at: float | None) -> None:
        n = len(last.token_ids) if last else 0
        ttft = (first_at - started) if first_at is not None else None
        now = time.monotonic()
        tpot_s = tpot(first_at, now, n)
        self._notify("finished", request_id, last, tpot_s, now - started)
        reason = last.finish_reason if last else "error"
        self.counters[f"finished_{reason}"] += 1
        if ttft is not None:
            self._recent.append((ttft, tpot_s))
        path = last.metrics.prefill_path if last else "local"
        self._journal("finished", request_id, finish_reason=reason, completion_tokens=n,
                      path=path)
        if self.state is not None and ttft is not None:
            wall = now - started
            m = last.metrics if last is not None else None
            self.state.record(PerfRecord(
                request_id=request_id, method=m.method if m else "none", prefill_path=path,
                ttft_s=ttft, tpot_s=tpot_s, tokens_per_s=n / wall if wall > 0 else 0.0,
                prompt_tokens=len(ids), output_tokens=n,
                acceptance_rate=m.acceptance_rate if m else None,
                mean_accepted_length=m.mean_accepted_length if m else None,
                forward_passes_per_token=m.num_forward_passes / n if m and n else None,
                features={"prompt_tokens": len(ids), "max_tokens": params.max_tokens,
                          "temperature": params.temperature}))

    def stats(self) -> dict[str, float]:
        """Counters, gauges and recent latency percentiles of this router."""
        ttfts = [t for t, _ in self._recent]
        tpots = [p for _, p in self._recent if p is not None]
        out: dict[str, float] = {k: float(v) for k, v in self.counters.items()}
        out.update(in_flight=float(self.in_flight),
                   decode_workers=float(len(self.dispatcher.decode)),
                   prefill_workers=float(len(self.dispatcher.prefill)),
                   retries=float(self.dispatcher.retries))
        for name, values in (("ttft", ttfts), ("tpot", tpots)):
            for q in (50, 99):
                v = percentile(values, q)
                if v is not None:
                    out[f"{name}_p{q}_s"] = v
        return out

    # -- workers ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin refreshing the worker set (call from the serving event loop)."""
        if self._refresh is not None and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None

    async def refresh_now(self) -> None:
        if self._refresh is None:
            return
        decode, prefill = await self._refresh()
        self.dispatcher.update(decode, prefill)

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh_now()
                if self.state is not None:
                    await asyncio.to_thread(self.state.update_router_stats, self.router_id,
                                            gauges=self.stats())
            except Exception:  # noqa: BLE001 - a failed refresh keeps the last worker set
                log.warning("worker refresh failed; keeping the last set", exc_info=True)
            await asyncio.sleep(self._refresh_s)
