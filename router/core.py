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
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from baton.router.dispatch import Dispatcher, WorkerClock
from baton.router.features import RequestFeatures
from baton.router.observer import RequestObserver
from baton.router.selection import Selection
from baton.router.selector import Choice
from baton.router.speed_model import NO_LOAD, Load, load_features
from baton.sampling import SamplingParams
from baton.speculation import AUTO, NONE
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


@dataclass(slots=True)
class _Selected:
    """How one request is served: its parameters (method set), the pool, what was seen."""

    params: SamplingParams
    features: RequestFeatures | None = None
    loads: dict[str, Load] = field(default_factory=dict)
    choice: Choice | None = None
    pool: str | None = None  # the pool it must run on (None: any)
    served_pool: str | None = None


class _Once:
    """Runs its call the first time it is called, and never again."""

    def __init__(self, call: Callable[[], None]):
        self._call: Callable[[], None] | None = call

    def __call__(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call()


class Router:
    """Validates, admits, dispatches and accounts for requests; one per front-end process.

    `state` is the cluster's shared state (None without Redis); `refresh` returns the current
    (decode handles, prefill handles, decode handle -> pool), called every `refresh_s` (None: a
    fixed set);
    `observer` hears of every request (see `RequestObserver`); `selection` picks the method
    (and pool) of `auto` requests, and computes every request's features for the history.
    """

    def __init__(self, model: ServedModel, dispatcher: Dispatcher, *,
                 state: RouterState | None = None, router_id: str | None = None,
                 limits: RouterLimits | None = None,
                 refresh: Callable[[], Any] | None = None, refresh_s: float = 1.0,
                 observer: RequestObserver | None = None, selection: Selection | None = None):
        self.model = model
        self.selection = selection
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
                       timeout_s: float | None = None, received_at: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; every failure is a `BatonError` with its gRPC status.

        `received_at` is when the front end received the request (`time.perf_counter()`; None:
        now): the router's own time is counted from it. Ask for the next output once the last
        one is written to the client: that is when its relay is taken to end.
        """
        if received_at is None:
            received_at = time.perf_counter()
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
            sel = self._select(ids, params)
            params = sel.params
        except BatonError as exc:
            self._notify("failed", request_id or "", type(exc).__name__)
            raise
        self.in_flight += 1
        self.counters["accepted"] += 1
        self._notify("accepted", request_id, len(ids))
        started = time.monotonic()
        # Journalled once the worker has been called (the loop runs it when this task first
        # waits), so the write is not on the way to the first token; written before any later
        # event of the request all the same.
        accepted = _Once(functools.partial(
            self._journal, "accepted", request_id, prompt_tokens=len(ids),
            max_tokens=params.max_tokens, method=params.method,
            selected_by="selector" if sel.choice is not None else "request"))
        asyncio.get_running_loop().call_soon(accepted)
        last: RequestOutput | None = None
        first_at: float | None = None
        clock = WorkerClock()
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    async for out in self.dispatcher.generate(request_id, ids, params, sel.pool,
                                                              clock):
                        first = first_at is None and bool(out.token_ids)
                        if first:
                            first_at = time.monotonic()
                            self._notify("first_token", request_id, first_at - started)
                        last = out
                        yield out
                        self._relayed(request_id, clock, received_at, first)
            finally:
                accepted()  # if the loop has not yet: before the request's end, whatever it is
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
            sel.served_pool = self.dispatcher.served_pool.pop(request_id, sel.pool)
        try:
            self._finished(request_id, ids, sel, last, started, first_at)
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

    def _relayed(self, request_id: str, clock: WorkerClock, received_at: float,
                 first: bool) -> None:
        """A chunk was written to the client: its relay, and for the first token's chunk, the
        router's whole share of the TTFT."""
        relay = time.perf_counter() - clock.chunk_at
        self._notify("relayed", request_id, relay)
        if first and clock.called_at is not None:
            self._notify("router_time", request_id, clock.called_at - received_at, relay)

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

    def _select(self, ids: list[int], params: SamplingParams) -> _Selected:
        """The method and pool of this request: the selector's for `auto` (without a selector,
        `auto` runs plainly), the request's own otherwise; and the features of an `auto` request
        (the others' are computed for the history once they have ended, off their way)."""
        if self.selection is None:
            return _Selected(params)
        try:
            loads = self._pool_loads()
            if params.method != AUTO:  # features for the history, computed once it has ended
                return _Selected(params, loads=loads)
            features = self.selection.features(ids, params)
            choice = self.selection.choose(features, params, loads)
        except BatonError:
            raise
        except Exception:  # noqa: BLE001 - a selector fault must not fail the request
            log.exception("method selection failed; serving the request plainly")
            return _Selected(dataclasses.replace(params, method=NONE))
        return _Selected(self.selection.apply(choice, params), features=features, loads=loads,
                         choice=choice, pool=choice.candidate.pool)

    def _pool_loads(self) -> dict[str, Load]:
        """Per pool: this router's requests in flight per worker, and the registry's KV usage
        and queue of its workers (`LOAD_FEATURES`)."""
        kv = self.selection.kv_usage if self.selection is not None else {}
        waiting = self.selection.waiting if self.selection is not None else {}
        return {pool: (math.log1p(busy / max(workers, 1)), kv.get(pool, 0.0),
                       math.log1p(waiting.get(pool, 0.0)))
                for pool, (busy, workers) in self.dispatcher.pool_loads().items()}

    def _finished(self, request_id: str, ids: list[int], sel: _Selected,
                  last: RequestOutput | None, started: float, first_at: float | None) -> None:
        params = sel.params
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
        if ttft is None or (self.state is None and self.selection is None):
            return
        wall = now - started
        m = last.metrics if last is not None else None
        choice = sel.choice
        pool = sel.served_pool or "default"
        features: dict[str, float] = {"prompt_tokens": len(ids), "max_tokens": params.max_tokens,
                                      "temperature": params.temperature}
        if sel.features is None and self.selection is not None:
            sel.features = self.selection.features(ids, params)
        if sel.features is not None:
            features = {**sel.features.as_dict(),
                        **load_features(sel.loads.get(pool, NO_LOAD))}
        offer = self.selection.offers.get(pool) if self.selection is not None else None
        rec = PerfRecord(
            request_id=request_id, method=m.method if m else "none", prefill_path=path,
            ttft_s=ttft, tpot_s=tpot_s, tokens_per_s=n / wall if wall > 0 else 0.0,
            prompt_tokens=len(ids), output_tokens=n,
            acceptance_rate=m.acceptance_rate if m else None,
            mean_accepted_length=m.mean_accepted_length if m else None,
            forward_passes_per_token=m.num_forward_passes / n if m and n else None,
            expert_cache=m.expert_cache if m else None,
            features=features, model=self.model.name, pool=pool,
            k=params.num_speculative_tokens,
            quantization=offer.quantization if offer is not None else None,
            selected_by="selector" if choice is not None else "request",
            explored=choice.explored if choice is not None else False,
            predicted_tokens_per_s=choice.predicted_tps if choice is not None else None,
            selector_version=choice.model_version if choice is not None else 0)
        if self.state is not None:
            self.state.record(rec)
        if choice is not None and self.selection is not None:
            self.selection.finished(choice, rec)
            self._notify("selected", rec)

    def stats(self) -> dict[str, float]:
        """Counters, gauges and recent latency percentiles of this router."""
        ttfts = [t for t, _ in self._recent]
        tpots = [p for _, p in self._recent if p is not None]
        out: dict[str, float] = {k: float(v) for k, v in self.counters.items()}
        out.update(in_flight=float(self.in_flight),
                   decode_workers=float(len(self.dispatcher.decode)),
                   prefill_workers=float(len(self.dispatcher.prefill)),
                   retries=float(self.dispatcher.retries))
        for transport, n in self.dispatcher.streams.items():
            out[f"worker_streams_{transport}"] = float(n)
        if self.selection is not None:
            sel = self.selection.stats()
            for key in ("model_version", "decisions", "explored"):
                out[f"selector_{key}"] = float(sel[key])
        for name, values in (("ttft", ttfts), ("tpot", tpots)):
            for q in (50, 99):
                v = percentile(values, q)
                if v is not None:
                    out[f"{name}_p{q}_s"] = v
        return out

    # -- workers ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin refreshing the worker set and the selector (call from the serving loop)."""
        if self._refresh is not None and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop())
        if self.selection is not None:
            self.selection.start()

    async def stop(self) -> None:
        self.dispatcher.close()
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        if self.selection is not None:
            await self.selection.stop()

    async def refresh_now(self) -> None:
        if self._refresh is not None:
            decode, prefill, pool_of = await self._refresh()
            self.dispatcher.update(decode, prefill, pool_of)
        await self.learn_pools()
        await self.dispatcher.connect()

    async def learn_pools(self) -> None:
        """Ask one worker of each pool the selector does not know yet what it serves."""
        if self.selection is None:
            return
        first: dict[str, Any] = {}
        for w in self.dispatcher.decode:
            first.setdefault(self.dispatcher.pool(w), w)
        for pool in set(self.selection.offers) - set(first):
            del self.selection.offers[pool]
        for pool, w in first.items():
            if pool not in self.selection.offers:
                self.selection.offer(pool, await w.info.remote())

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh_now()
                if self.state is not None:
                    await asyncio.to_thread(self.state.update_router_stats, self.router_id,
                                            gauges=self.stats())
            except Exception as exc:  # noqa: BLE001 - a failed refresh keeps the last set
                # The controller restarting, most often: its workers still serve.
                log.warning("worker refresh failed (%s); keeping the last set", exc)
            await asyncio.sleep(self._refresh_s)
