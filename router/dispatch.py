"""Sends each request to a decode worker (and, for its prompt, a prefill worker) and streams back.

Worker choice is by load (the live worker with the fewest of this dispatcher's requests in
flight, ties broken in turn), bent by prefix-cache affinity (`affinity.py`). A decode worker
that dies before the request's first token was streamed is marked dead and the request goes to
another one; once tokens have reached the caller a death ends the stream with
`WorkerUnavailableError` (re-running would repeat text the caller already has). A caller that
stops reading aborts the request in its worker, freeing its blocks. The dispatcher renews a
lease on its requests with each worker streaming one (`Worker.renew`, every `renew_s`): if its
process dies, the workers abort its requests rather than decode them to `max_tokens` for no one.

Requests stream over each decode worker's gRPC request link (`worker_link.py`), Ray's streaming
calls being about twice as slow to a first item; control calls (renewals, aborts) stay on Ray. A
link that fails before its first output sends that worker's requests over Ray from then on.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError

from baton.errors import ConfigError, WorkerUnavailableError
from baton.outputs import RequestOutput
from baton.router.affinity import PrefixAffinity, prefix_hashes
from baton.router.worker_link import LinkLost, RequestStream, WorkerLinks, pack_request
from baton.router.worker_streams import RaySource, Source, open_stream
from baton.sampling import SamplingParams

log = logging.getLogger(__name__)

TRANSPORTS = ("grpc", "ray")  # how the dispatcher streams a request from its decode worker


def prefill_remotely(has_prefill_worker: bool, uncached_tokens: int, threshold: int) -> bool:
    """Conditional disaggregation: whether a prompt goes to a prefill worker (its KV shipped back)
    rather than being prefilled where it decodes; only prompts with at least `threshold`
    uncached tokens are worth the transfer."""
    return has_prefill_worker and uncached_tokens >= threshold


@dataclass(slots=True)
class WorkerClock:
    """When the dispatcher first called a decode worker for one request, and when that request's
    latest chunk reached it (`time.perf_counter()`): the router's own time is measured from
    these."""

    called_at: float | None = None
    chunk_at: float = 0.0


class WorkerSet:
    """Actor handles of one role with this dispatcher's in-flight count each; dead ones drop out.

    Workers are kept bucketed by load (positions in registration order), so picking the least
    loaded costs O(log n) rather than a scan: a planner simulating a thousand workers calls it
    per request.
    """

    def __init__(self, workers: Sequence[Any]):
        self._turn = itertools.count()
        self._set(workers, {})

    def _set(self, workers: Sequence[Any], known: dict[Any, int]) -> None:
        self._load: dict[Any, int] = {w: known.get(w, 0) for w in workers}
        self._pos: dict[Any, int] = {w: i for i, w in enumerate(self._load)}
        self._by_pos: list[Any] = list(self._load)
        self._at: dict[int, list[int]] = {}  # load -> sorted positions of workers at that load
        for w, n in self._load.items():
            self._at.setdefault(n, []).append(self._pos[w])

    def _move(self, worker: Any, old: int, new: int) -> None:
        pos = self._pos[worker]
        bucket = self._at[old]
        del bucket[bisect.bisect_left(bucket, pos)]
        if not bucket:
            del self._at[old]
        into = self._at.get(new)
        if into is None:
            self._at[new] = [pos]
        else:
            bisect.insort(into, pos)

    def __len__(self) -> int:
        return len(self._load)

    def __iter__(self):
        return iter(list(self._load))

    def loads(self, exclude: Sequence[Any] = ()) -> dict[Any, int]:
        return {w: n for w, n in self._load.items() if w not in exclude}

    def pick(self, exclude: Sequence[Any] = (), prefer: Any = None) -> Any | None:
        """The preferred worker if live, else the least loaded (ties in turn), or None."""
        if not exclude:
            if not self._load:
                return None
            if prefer is not None and prefer in self._load:
                return prefer
            least = self._at[min(self._at)]
            return self._by_pos[least[next(self._turn) % len(least)]]
        live = [w for w in self._load if w not in exclude]
        if not live:
            return None
        if prefer is not None and prefer in live:
            return prefer
        low = min(self._load[w] for w in live)
        candidates = [w for w in live if self._load[w] == low]
        return candidates[next(self._turn) % len(candidates)]

    @contextlib.contextmanager
    def hold(self, worker: Any):
        self.take(worker)
        try:
            yield worker
        finally:
            self.release(worker)

    def take(self, worker: Any) -> None:
        """Count one more request in flight on `worker` (`hold` without the context manager: the
        planner's simulator takes and releases millions)."""
        n = self._load[worker]
        self._load[worker] = n + 1
        self._move(worker, n, n + 1)

    def release(self, worker: Any) -> None:
        """Undo one `take` (a worker dropped meanwhile is left alone)."""
        if worker in self._load:
            n = self._load[worker]
            self._load[worker] = n - 1
            self._move(worker, n, n - 1)

    def load(self, worker: Any) -> int:
        return self._load.get(worker, 0)

    def drop(self, worker: Any) -> None:
        if worker in self._load:
            self._set([w for w in self._load if w != worker], self._load)

    def replace(self, workers: Sequence[Any]) -> None:
        """Take a fresh worker list (from the controller): keep known loads, forget the gone."""
        self._set(workers, self._load)


class Dispatcher:
    """Streams requests through a cluster's decode workers, prefilling long prompts elsewhere.

    `decode` are workers of role decode or both; `prefill` are prefill workers (none: every
    prompt is prefilled where it decodes). Called from one asyncio loop.
    """

    def __init__(self, decode: Sequence[Any], prefill: Sequence[Any] = (), max_attempts: int = 2,
                 renew_s: float = 1.0, transport: str = "grpc"):
        if transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.decode = WorkerSet(decode)
        self.prefill = WorkerSet(prefill)
        self.max_attempts = max_attempts
        self.retries = 0
        self.affinity = PrefixAffinity()
        self.pool_of: dict[Any, str] = {}  # decode worker -> its pool (unknown: "default")
        self._where: dict[str, Any] = {}  # request id -> the decode worker streaming it
        # request id -> the pool that served it; the router takes it when the request ends.
        self.served_pool: dict[str, str] = {}
        self.caller_id = f"dispatcher-{uuid.uuid4().hex[:12]}"  # whose leases it renews
        self.renew_s = renew_s
        self._renewer: asyncio.Task[None] | None = None
        # "grpc": requests stream over each worker's request link (`worker_link.py`); "ray":
        # through `Worker.stream`, as every request does where a link fails.
        self.links = WorkerLinks() if transport == "grpc" else None
        self.streams = dict.fromkeys(TRANSPORTS, 0)  # worker calls made over each transport

    def close(self) -> None:
        """Stop renewing leases (its requests' workers then abort what is left of them)."""
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None

    def _keep_renewing(self) -> None:
        task = self._renewer
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._renewer = asyncio.create_task(self._renew_leases())

    async def _renew_leases(self) -> None:
        while self._where:
            await asyncio.sleep(self.renew_s)
            # A dead or slow worker must not hold up the others' renewals.
            await asyncio.gather(*(asyncio.wait_for(w.renew.remote(self.caller_id), self.renew_s)
                                   for w in set(self._where.values())), return_exceptions=True)

    async def connect(self) -> None:
        """Learn the request link of every decode worker not yet known (else its first request
        asks for it)."""
        if self.links is not None:
            await asyncio.gather(*(self.links.endpoint(w) for w in self.decode))

    def workers(self) -> list[Any]:
        return [*self.decode, *self.prefill]

    def update(self, decode: Sequence[Any], prefill: Sequence[Any],
               pool_of: dict[Any, str] | None = None) -> None:
        self.decode.replace(decode)
        self.prefill.replace(prefill)
        if self.links is not None:
            self.links.keep_only({*decode, *prefill})
        if pool_of is not None:
            self.pool_of = pool_of

    def pool(self, worker: Any) -> str:
        return self.pool_of.get(worker, "default")

    def pool_loads(self) -> dict[str, tuple[int, int]]:
        """Per pool of decode workers: (this dispatcher's requests in flight, live workers)."""
        out: dict[str, tuple[int, int]] = {}
        for w, n in self.decode.loads().items():
            busy, count = out.get(self.pool(w), (0, 0))
            out[self.pool(w)] = (busy + n, count + 1)
        return out

    async def abort(self, request_id: str) -> bool:
        """Stop a request wherever it runs (every decode worker is asked when this dispatcher
        did not send it: another router may have); False when no worker held it."""
        worker = self._where.get(request_id)
        targets = [worker] if worker is not None else list(self.decode)
        done = await asyncio.gather(*(w.abort.remote(request_id) for w in targets),
                                    return_exceptions=True)
        return any(d is True for d in done)

    @classmethod
    def for_pools(cls, pools, **kw) -> Dispatcher:
        return cls(pools.by_role("decode", "both"), pools.by_role("prefill"), **kw)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       pool: str | None = None, clock: WorkerClock | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request from a decode worker (of `pool`, when given); `clock`, if given, is
        stamped with the worker call and each chunk's arrival."""
        tried: list[Any] = [w for w in self.decode if pool is not None and self.pool(w) != pool]
        others = len(tried)
        hashes = (prefix_hashes(prompt, self.affinity.block_size, self.affinity.max_blocks)
                  if isinstance(prompt, list) else [])
        while True:
            prefer = self.affinity.choose(hashes, self.decode.loads(exclude=tried))
            worker = self.decode.pick(exclude=tried, prefer=prefer)
            if worker is None or len(tried) - others >= self.max_attempts:
                where = f" in pool {pool!r}" if pool is not None else ""
                raise WorkerUnavailableError(
                    f"no live decode worker{where} could take {request_id} (tried "
                    f"{len(tried) - others}); add or restart decode workers, then send it again")
            tried.append(worker)
            self.affinity.remember(hashes, worker)
            streamed = False
            try:
                async for out in self._stream(worker, request_id, prompt, params, clock):
                    streamed = True
                    yield out
                return
            except LinkLost as exc:
                if streamed:
                    raise WorkerUnavailableError(
                        f"the stream of {request_id} from its decode worker broke after tokens "
                        f"were sent ({exc}); send the request again") from exc
                assert self.links is not None
                self.links.give_up(worker, exc)  # and try it again, over Ray
                tried.pop()
            except RayActorError as exc:
                self.decode.drop(worker)
                self.affinity.forget(worker)
                if streamed:
                    raise WorkerUnavailableError(
                        f"the decode worker of {request_id} died after streaming tokens ({exc}); "
                        "send the request again") from exc
                self.retries += 1
                log.warning("decode worker died before %s's first token; retrying", request_id)

    async def _stream(self, worker: Any, request_id: str, prompt, params,
                      clock: WorkerClock | None) -> AsyncIterator[RequestOutput]:
        prefill = self.prefill.pick()
        link = await self.links.endpoint(worker) if self.links is not None else None
        with self.decode.hold(worker), (self.prefill.hold(prefill) if prefill is not None
                                        else contextlib.nullcontext()):
            if link is not None:
                assert self.links is not None
                packed = pack_request(request_id, prompt, params, self.caller_id,
                                      self.links.pickled(prefill))
                source: Source = RequestStream(link, packed)
                self.streams["grpc"] += 1
            else:
                source = RaySource(open_stream(worker, request_id, prompt, params, prefill,
                                                self.caller_id))
                self.streams["ray"] += 1
            if clock is not None and clock.called_at is None:
                clock.called_at = time.perf_counter()
            finished = False
            self._where[request_id] = worker
            self._keep_renewing()
            self.served_pool[request_id] = self.pool(worker)
            try:
                async for chunk in source.chunks():
                    if clock is not None:
                        clock.chunk_at = time.perf_counter()
                    out = await source.unpack(chunk)
                    finished = out.finished
                    yield out
            finally:
                self._where.pop(request_id, None)
                if not finished:
                    # The caller left (or the worker failed): make sure nothing stays reserved.
                    with contextlib.suppress(Exception):
                        source.cancel()
                        await worker.abort.remote(request_id)
