"""The two systems `baton bench serve` loads, and the router-overhead probe.

Both systems stream cumulative progress to the open-loop client. Once SLOs are set, a request
still running at `ttft_slo + (max_tokens - 1) * tpot_slo` (plus a grace) is cut there: had it met
both SLOs it would have finished by then, so it is a certain miss, and a system far past its
capacity cannot stretch the run without bound. A cut request's TTFT and TPOT are recorded as the
lower bounds known at the cut (which still miss the SLO), its tokens as those that arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp

from baton.client import AsyncBatonClient
from baton.ops.bench import worker_load
from baton.ops.bench.openloop import SLO, run_open_loop
from baton.ops.bench.router_time import Scrape, scrape, summary
from baton.ops.bench.transformers_serve import (
    StreamProgress,
    TransformersServe,
    completion_body,
    stream_completion,
)
from baton.ops.bench.workload import BenchRequest, RequestTiming
from baton.router.worker_link import RequestStream, WorkerLinks, pack_request
from baton.router.worker_streams import open_stream, unpack_output
from baton.sampling import SamplingParams
from baton.stats import percentile

CUT_GRACE_S = 1.0

Timings = tuple[list[RequestTiming], float]


class Target:
    """One system under open-loop load: `run` drives it, `checks` counts requests that came back
    short or whose prompt the server counted differently (a fair comparison needs neither)."""

    name = ""

    def __init__(self) -> None:
        self.slo: SLO | None = None  # set once calibrated: requests are cut at its deadline
        self.checks = {"requests": 0, "short_outputs": 0, "prompt_token_mismatches": 0}
        self.cut: dict[int, int] = {}  # last run: request index -> tokens it got before the cut
        # Last run: request index -> (forward passes that made tokens, draft tokens verified,
        # the acceleration method), for requests whose system reported them.
        self.served: dict[int, tuple[int, int, str | None]] = {}
        self._num_requests = 0

    def run(self, requests: Sequence[BenchRequest], arrivals: Sequence[float]) -> Timings:
        self.cut, self.served = {}, {}
        self._num_requests = len(requests)
        timings, wall = asyncio.run(self._run(requests, arrivals))
        for i, tokens in self.cut.items():
            timings[i].tokens = tokens
        return timings, wall

    def notes(self) -> dict[str, Any]:
        """The last run's cuts; for a system that reports them, each request's forward passes and
        draft tokens (None where it did not report), which a replay of the run decodes as."""
        notes: dict[str, Any] = {"cut_at_slo_deadline": len(self.cut)}
        if self.served:
            served = [self.served.get(i) for i in range(self._num_requests)]
            notes["forward_passes"] = [s and s[:2] for s in served]
            notes["methods"] = [s and s[2] for s in served]
        return notes

    async def _run(self, requests: Sequence[BenchRequest],
                   arrivals: Sequence[float]) -> Timings:
        raise NotImplementedError

    async def _watched(self, i: int, req: BenchRequest,
                       stream: AsyncIterator[StreamProgress]) -> AsyncIterator[StreamProgress]:
        last = StreamProgress()
        start = time.perf_counter()  # the open-loop client calls send at the arrival time
        budget = None if self.slo is None else (
            self.slo.ttft_s + (req.max_tokens - 1) * self.slo.tpot_s + CUT_GRACE_S)
        it = aiter(stream)
        try:
            while True:
                left = None if budget is None else budget - (time.perf_counter() - start)
                try:
                    last = await asyncio.wait_for(anext(it), left)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    self.cut[i] = last.tokens
                    # Seen now: the open-loop client takes TTFT (nothing came yet) or TPOT over
                    # all the tokens asked for from this moment, both bounds below the truth.
                    yield StreamProgress(tokens=1 if not last.tokens else req.max_tokens)
                    return
                yield last
        finally:
            await it.aclose()  # type: ignore[attr-defined]
        self.checks["requests"] += 1
        self.checks["short_outputs"] += last.tokens < req.max_tokens
        if last.forward_passes is not None:
            self.served[i] = (last.forward_passes, last.draft_tokens, last.method)
        self.checks["prompt_token_mismatches"] += last.prompt_tokens not in (
            None, len(req.prompt_ids))


class BatonTarget(Target):
    """Baton through its gRPC API, prompts as token ids; `metrics_url` is its router's
    `/metrics` (None: the router has no HTTP front end, and its own time goes unread);
    `workers` lists the cluster's workers (controller entries with a `handle`), whose loads over
    each run the notes keep (`worker_load`)."""

    name = "baton"

    def __init__(self, address: str, token: str | None, metrics_url: str | None = None,
                 workers: Callable[[], list[dict[str, Any]]] | None = None):
        super().__init__()
        self.address, self.token, self.metrics_url = address, token, metrics_url
        self._workers = workers
        self._loads: list[dict[str, Any]] = []

    def run(self, requests: Sequence[BenchRequest], arrivals: Sequence[float]) -> Timings:
        if self._workers is None:
            return super().run(requests, arrivals)
        handles = [w["handle"] for w in self._workers()]
        timings, wall, self._loads = worker_load.during(
            handles, lambda: super(BatonTarget, self).run(requests, arrivals))
        return timings, wall

    def notes(self) -> dict[str, Any]:
        notes = super().notes()
        if self._workers is not None:
            notes["workers"] = self._loads
        return notes

    async def router_time(self) -> Scrape | None:
        """The router's own-time histograms now (None without a metrics URL)."""
        if self.metrics_url is None:
            return None
        return await scrape(self.metrics_url, self.token)

    async def _run(self, requests: Sequence[BenchRequest],
                   arrivals: Sequence[float]) -> Timings:
        async with AsyncBatonClient(self.address, token=self.token) as client:
            def send(i: int, req: BenchRequest) -> AsyncIterator[StreamProgress]:
                return self._watched(i, req, grpc_stream(client, req.prompt_ids,
                                                         req.max_tokens))

            return await run_open_loop(send, requests, arrivals)


class PeerTarget(Target):
    """`transformers serve` over HTTP, prompts as the text those token ids decode to."""

    name = "transformers_serve"

    def __init__(self, server: TransformersServe, tokenizer: Any):
        super().__init__()
        self.server, self.tokenizer = server, tokenizer

    async def _run(self, requests: Sequence[BenchRequest],
                   arrivals: Sequence[float]) -> Timings:
        texts = [self.tokenizer.decode(r.prompt_ids) for r in requests]
        # No client-side connection limit: open-loop requests never queue in the client.
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            def send(i: int, req: BenchRequest) -> AsyncIterator[StreamProgress]:
                body = completion_body(self.server.model_id, texts[i], req.max_tokens)
                return self._watched(i, req, stream_completion(session, self.server.url, body))

            return await run_open_loop(send, requests, arrivals)


async def grpc_stream(client: AsyncBatonClient, prompt_ids: list[int],
                      max_tokens: int) -> AsyncIterator[StreamProgress]:
    """A greedy generation of exactly `max_tokens` through the router, as cumulative progress."""
    progress = StreamProgress()
    async for chunk in client.generate(prompt_ids, max_tokens=max_tokens, ignore_eos=True,
                                       temperature=0.0):
        progress.tokens += len(chunk.token_ids)
        progress.prompt_tokens = chunk.prompt_tokens or progress.prompt_tokens
        progress.finish_reason = chunk.finish_reason
        if chunk.spec_decode is not None:
            progress.forward_passes = chunk.spec_decode.num_forward_passes
            progress.draft_tokens = chunk.spec_decode.num_draft_tokens
            progress.method = chunk.spec_decode.method or None
        yield progress


# -- the router's own latency ---------------------------------------------------------------------


async def _ttft(stream: AsyncIterator[Any], t0: float) -> float:
    first = None
    async for out in stream:  # drained to the end, so nothing is left running
        if first is None and len(out.token_ids):
            first = time.perf_counter()
    if first is None:
        raise RuntimeError("a probe request ended without a token")
    return first - t0


async def _direct(links: WorkerLinks, worker: Any, request_id: str,
                  ids: list[int]) -> AsyncIterator[Any]:
    """A one-token request straight to `worker`, over its request link as the router sends it
    (over Ray where it has none)."""
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    link = await links.endpoint(worker)
    if link is None:
        async for ref in open_stream(worker, request_id, ids, params):
            yield await unpack_output(ref)
        return
    stream = RequestStream(link, pack_request(request_id, ids, params, None, None))
    async for frame in stream.chunks():
        yield await stream.unpack(frame)


async def router_overhead(target: BatonTarget, worker: Any, prompts: list[list[int]],
                          warm: int = 3) -> dict[str, Any]:
    """The router's own time on one-token requests, one at a time: as the router timed itself
    (`in_router`, its histograms over the probe; `overhead_ms_*` is its share of the TTFT), and
    as the difference of TTFTs through the router and straight to `worker` (a decode worker
    actor, over its request link as the router calls it), alternating which goes first. Two
    prompts a pair (none sent twice), the first `warm` pairs not counted."""
    ttfts: dict[str, list[float]] = {"router": [], "direct": []}
    before: Scrape | None = None
    links = WorkerLinks()
    async with AsyncBatonClient(target.address, token=target.token) as client:
        for k in range(len(prompts) // 2):
            if k == warm:
                before = await target.router_time()
            order = ("router", "direct") if k % 2 == 0 else ("direct", "router")
            for path, ids in zip(order, prompts[2 * k:2 * k + 2], strict=True):
                t0 = time.perf_counter()
                stream = (grpc_stream(client, ids, 1) if path == "router"
                          else _direct(links, worker, f"bench-direct-{k}", ids))
                ttft = await _ttft(stream, t0)
                if k >= warm:
                    ttfts[path].append(ttft * 1000)
    after = await target.router_time()
    out: dict[str, Any] = {"requests_per_path": len(ttfts["router"]), "max_tokens": 1,
                           "prompt_tokens": sorted({len(p) for p in prompts})}
    in_router = summary(before, after) if before is not None and after is not None else None
    out["in_router"] = in_router
    for q in ("p50", "p99"):
        out[f"overhead_ms_{q}"] = in_router["added_ttft"][f"{q}_ms"] if in_router else None
    for path, values in ttfts.items():
        out[f"{path}_ttft_ms_p50"] = percentile(values, 50)
        out[f"{path}_ttft_ms_p99"] = percentile(values, 99)
    # The older, noisier estimate: a difference of two TTFTs, each with the worker's jitter.
    for q in ("p50", "p99"):
        out[f"ttft_difference_ms_{q}"] = (out[f"router_ttft_ms_{q}"]
                                          - out[f"direct_ttft_ms_{q}"])
    # Less sensitive to drift over the run: each pair's difference, sent back to back.
    out["paired_ttft_difference_ms_p50"] = percentile(
        [r - d for r, d in zip(ttfts["router"], ttfts["direct"], strict=True)], 50)
    return out
