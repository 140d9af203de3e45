"""A Baton worker: one engine in a Ray actor, in a prefill, decode or combined role.

Decode first (DistServe, Splitwise): the decode worker admits a request and reserves its KV
blocks, then asks a prefill worker to compute the prompt and push the KV straight into those
blocks over the gRPC KV link, and decodes it in its continuous batch, streaming outputs back (a
Ray streaming generator). Prompts with few uncached tokens are prefilled locally. When the
handoff fails (prefill worker gone, transfer refused or stalled) the reservation is freed and the
request is prefilled locally instead, so a caller sees its tokens or one clear error.

A caller that names itself (`generate(..., caller=...)`, as the router's dispatcher does) holds a
lease on its requests: it calls `renew(caller)` about once a second, and a caller silent for
`caller_lease_s` (its process died: Ray does not cancel a streaming generator whose owner is
gone) has its requests aborted and their blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from baton.actors.host_memory import keep_freed_memory
from baton.actors.output_stream import OutputStream
from baton.engine_config import EngineConfig
from baton.errors import (
    BatonError,
    CapacityError,
    ConfigError,
    KVTransferError,
    RequestNotFoundError,
)
from baton.outputs import RequestOutput
from baton.router.dispatch import prefill_remotely
from baton.router.worker_link import LinkLost, WorkerLinks
from baton.sampling import SamplingParams

if TYPE_CHECKING:
    from baton.actors.handoff import HandoffEngine, ImportReservation
    from baton.actors.kv_link import KVSender
    from baton.actors.request_server import RequestServer

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")


@dataclass(slots=True)
class WorkerSpec:
    """What one worker runs: its role, model and engine options, and the KV link settings.

    `engine` may be given as a dict of options: it is validated on construction, in the caller's
    process, so a bad option fails before the actor starts. Its `model` is always `model`.
    """

    role: str = "both"
    model: str = "default"
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_token: str = ""
    # Where the worker's KV receiver and request endpoint listen; None: this node's IP, as Ray
    # knows it (the loopback address on a `baton up` machine, the pod's IP under KubeRay), so
    # a prefill worker or router on another node reaches them.
    kv_host: str | None = None
    kv_timeout_s: float = 30.0
    # Prompts with fewer uncached tokens than this are prefilled on the decode worker itself.
    prefill_threshold: int = 64
    # CPU cores this worker's process is pinned to (two workers on one box get disjoint sets).
    cpu_affinity: list[int] | None = None
    # A caller that has not renewed its lease this long has its requests aborted.
    caller_lease_s: float = 5.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.caller_lease_s <= 0:
            raise ConfigError(f"caller_lease_s must be > 0, got {self.caller_lease_s}")
        if not self.kv_token:
            raise ConfigError("kv_token is required: the KV link refuses unauthenticated pushes")
        if isinstance(self.engine, EngineConfig):
            self.engine = self.engine.model_copy(update={"model": self.model})
        else:
            self.engine = EngineConfig.from_options(model=self.model, **self.engine)


class Worker:
    """The actor class (wrapped with `ray.remote` by the cluster): engine, loop, KV link ends."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        if spec.cpu_affinity:
            # Before the engine starts torch's thread pool, so its threads inherit the mask.
            os.sched_setaffinity(0, spec.cpu_affinity)
        # The engine's modules (torch, transformers: about 10 s of CPU on a slow machine) load
        # here, in the worker's process, not in every process that only starts workers.
        from baton.actors.engine_loop import EngineLoop
        from baton.actors.handoff import HandoffEngine
        from baton.actors.kv_link import KVReceiver

        keep_freed_memory()  # KV payloads and frames of MiBs, allocated per transfer
        self.engine = HandoffEngine(config=spec.engine)
        self.loop = EngineLoop(self.engine)
        self.host = spec.kv_host or ray.util.get_node_ip_address()
        self.receiver = (
            KVReceiver(self.engine.cache, spec.kv_token, self.host)
            if spec.role in ("decode", "both") else None
        )
        self._senders: dict[str, KVSender] = {}
        self.handoffs = 0
        self.handoff_failures = 0
        # Prefill workers' request links: a handoff's call goes over gRPC, not Ray.
        self._prefill_links = WorkerLinks(role="prefill worker")
        self.handoff_calls = {"grpc": 0, "ray": 0}
        self._renewed: dict[str, float] = {}  # caller -> when it last renewed its lease
        # request id -> (its caller, the task streaming it), for requests streamed under a lease
        self._leased: dict[str, tuple[str, asyncio.Task[Any]]] = {}
        self._lease_watch: asyncio.Task[None] | None = None
        self.lease_expiries = 0
        self._requests: asyncio.Task[RequestServer] | None = None
        log.info("worker %s ready (pid %d)", spec.role, os.getpid())

    async def info(self) -> dict[str, Any]:
        return {
            "role": self.spec.role,
            "pid": os.getpid(),
            "kv_address": self.receiver.address if self.receiver else None,
            "model": self.engine.source.name,
            "vocab_size": self.engine.vocab_size,
            "max_model_len": self.engine.max_model_len,
            "methods": list(self.engine.speculator.settings.methods),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "quantization": self.spec.engine.quantization,
            "num_running": self.engine.num_running,
            "num_waiting": self.engine.num_waiting,
            "kv_usage": self.engine.blocks.usage,
            "expert_cache": self.engine.expert_cache_stats(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "handoffs": self.handoffs,
            "handoff_failures": self.handoff_failures,
            "handoff_calls_grpc": self.handoff_calls["grpc"],
            "handoff_calls_ray": self.handoff_calls["ray"],
            "finished": dict(self.loop.finished),
            "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "lease_expiries": self.lease_expiries,
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            "loop_timings": self.loop.timings.as_dict(),
            "process_cpu_s": time.process_time(),
        }

    async def renew(self, caller: str) -> int:
        """Keep `caller`'s requests alive another `caller_lease_s`; how many it has here."""
        self._renewed[caller] = time.monotonic()
        return sum(1 for c, _ in self._leased.values() if c == caller)

    async def describe(self) -> tuple[WorkerSpec, dict[str, Any]]:
        """Its launch spec (the KV-link token included) and `info()`: for a restarted
        controller adopting it, which gives the token to the replacements it starts."""
        return self.spec, await self.info()

    async def block_violations(self) -> list[str]:
        return await self.loop.acall(lambda e: e.block_violations())

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False when this worker does not hold it."""

        def stop(e: HandoffEngine) -> bool:
            try:
                e.abort(request_id)
            except RequestNotFoundError:
                return False
            return True

        return await self.loop.acall(stop)

    # -- decode side ------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams, prefill: Any = None,
                       caller: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; with a prefill worker handle, long prompts go through it.
        With `caller`, the request lives only while that caller renews its lease."""
        if caller is not None:
            self._lease(caller, request_id)
        try:
            async for out in self._generate(request_id, prompt, params, prefill):
                yield out
        finally:
            self._leased.pop(request_id, None)

    async def stream(self, packed: bytes, prefill: Any = None) -> AsyncIterator[bytes]:
        """`generate` as the router calls it: (request id, prompt, params, caller) pickled into
        one argument (`open_stream`), each output pickled back (`unpack_output`). Ray serializes
        every argument and streamed item on its own, through msgpack and then pickle; five
        arguments cost the router's loop about 0.3 ms a request and each output's `ray.get`
        about 0.15 ms more than bytes do. The prefill handle stays a Ray argument, so Ray counts
        the reference."""
        request_id, prompt, params, caller = pickle.loads(packed)
        async for out in self.generate(request_id, prompt, params, prefill, caller):
            yield pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)

    async def request_endpoint(self) -> tuple[str, str]:
        """(address, token) of this worker's gRPC request endpoint, where the router streams
        requests as `stream` takes them, without Ray on their path (`actors/request_server.py`).
        Started on first ask, on the actor's own event loop."""
        if self._requests is None:
            from baton.actors.request_server import RequestServer

            server = RequestServer(self.generate, self.prefill, self.host)  # behind its own token
            self._requests = asyncio.ensure_future(server.start())
        server = await asyncio.shield(self._requests)
        return server.address, server.token

    def _lease(self, caller: str, request_id: str) -> None:
        task = asyncio.current_task()
        assert task is not None  # called from the generator's task
        self._renewed[caller] = time.monotonic()  # a new request is a sign of life
        self._leased[request_id] = (caller, task)
        if self._lease_watch is None or self._lease_watch.done():
            self._lease_watch = asyncio.create_task(self._expire_leases())

    async def _expire_leases(self) -> None:
        """Cancel the streams of callers whose lease ran out (their `finally` frees the
        blocks); ends once no request is leased."""
        lease = self.spec.caller_lease_s
        interval = lease / 4
        tick = time.monotonic()
        while self._leased:
            await asyncio.sleep(interval)
            now = time.monotonic()
            stalled = now - tick - interval
            tick = now
            if stalled > interval:
                # This loop could not run (starved of CPU, or blocked): no renewal could be heard
                # meanwhile, and some may wait in the queue. The stall does not count against
                # any caller's lease; the check comes at the next tick, after those renewals.
                log.info("lease watch ran %.1f s late; leases extended by that", stalled)
                for caller in self._renewed:
                    self._renewed[caller] += stalled
                continue
            for request_id, (caller, task) in list(self._leased.items()):
                if now - self._renewed.get(caller, now) > lease:
                    log.warning("caller %s of %s stopped renewing its lease (%.1f s); aborting "
                                "the request", caller, request_id, lease)
                    self._leased.pop(request_id, None)
                    self.lease_expiries += 1
                    task.cancel()
            holders = {c for c, _ in self._leased.values()}
            for caller in [c for c in self._renewed if c not in holders]:
                del self._renewed[caller]

    async def _generate(self, request_id: str, prompt: str | list[int],
                        params: SamplingParams, prefill: Any) -> AsyncIterator[RequestOutput]:
        outputs = OutputStream(asyncio.get_running_loop())
        remote = prefill is not None and self.receiver is not None
        finished = admitted = False
        try:
            reservation = await self.loop.acall(
                lambda e: self._admit(e, request_id, prompt, params, outputs.put, remote)
            )
            admitted = True
            if reservation is not None:
                await self._handoff(reservation, prompt, params, prefill)
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        except asyncio.CancelledError:
            admitted = True  # cancelled while being admitted: it may have been
            raise
        finally:
            # The caller went away (or its lease lapsed), even mid-handoff: free its blocks. A
            # request refused at admission is not this call's to abort (its id may be taken).
            if admitted and not finished:
                await self.loop.acall(lambda e: _abort_quietly(e, request_id))

    def _admit(self, engine: HandoffEngine, request_id: str, prompt, params, sink,
               remote: bool) -> ImportReservation | None:
        """On the loop thread: reserve for a remote prefill, or queue for a local one.

        Subscribes only once the engine accepted the request (a rejected one raises to the caller).
        """
        reservation = None
        if remote:
            ids = engine.encode(prompt)
            if prefill_remotely(remote, engine.uncached_tokens(ids), self.spec.prefill_threshold):
                try:
                    reservation = engine.reserve_import(ids, params, request_id)
                except CapacityError:
                    log.info("no blocks to reserve for %s; prefilling locally", request_id)
        if reservation is None:
            engine.add_request(prompt, params, request_id)
        self.loop.subscribe(request_id, sink)
        return reservation

    async def _handoff(self, res: ImportReservation, prompt, params, prefill) -> None:
        assert self.receiver is not None
        transfer_id = f"{res.request_id}/{uuid.uuid4().hex[:8]}"
        self.handoffs += 1
        self.receiver.expect(transfer_id, res.request_id, res.block_ids, self.spec.kv_timeout_s)
        try:
            first = await self._call_prefill(
                prefill, transfer_id, res.request_id, prompt, params, self.receiver.address,
                res.block_ids, res.skip_blocks,
            )
            transfer = await asyncio.to_thread(self.receiver.wait, transfer_id)
        except asyncio.CancelledError:
            # Refuse the push from now on: its blocks are about to be freed for other requests.
            self.receiver.forget(transfer_id)
            raise
        except Exception as exc:  # prefill actor died, transfer refused or stalled
            self.receiver.forget(transfer_id)
            self.handoff_failures += 1
            log.warning("handoff of %s failed (%s); prefilling locally", res.request_id, exc)

            def local(e: HandoffEngine) -> None:
                e.cancel_import(res.request_id)
                e.add_request(prompt, params, res.request_id)

            await self.loop.acall(local)
            return
        await self.loop.acall(
            lambda e: e.complete_import(res.request_id, first, transfer.bytes_received))

    async def _call_prefill(self, prefill: Any, *args: Any) -> int:
        """`prefill.prefill(*args)` over the prefill worker's request link, or over Ray where it
        has none. A call that fails on the link fails this handoff, and sends that worker's later
        ones over Ray."""
        end = await self._prefill_links.endpoint(prefill)
        if end is None:
            self.handoff_calls["ray"] += 1
            first: int = await prefill.prefill.remote(*args)
            return first
        self.handoff_calls["grpc"] += 1
        try:
            return await end.prefill(*args)
        except LinkLost as exc:
            self._prefill_links.give_up(prefill, exc)
            raise

    # -- prefill side -----------------------------------------------------------------------------

    async def prefill(self, transfer_id: str, request_id: str, prompt: str | list[int],
                      params: SamplingParams, kv_address: str, dst_block_ids: list[int],
                      skip_blocks: int) -> int:
        """Compute a prompt, push its KV layer by layer to `kv_address`; return the first token."""
        aloop = asyncio.get_running_loop()
        first: asyncio.Future[RequestOutput] = aloop.create_future()
        local_id = f"{request_id}/prefill/{transfer_id.rsplit('/', 1)[-1]}"

        def sink(out: RequestOutput) -> None:
            if out.finished:
                aloop.call_soon_threadsafe(first.set_result, out)

        def start(e: HandoffEngine):
            self.loop.subscribe(local_id, sink)
            return e.add_export(prompt, params, skip_blocks, local_id)

        _, export = await self.loop.acall(start)
        sender = self._sender(kv_address)
        push = asyncio.to_thread(sender.push, transfer_id, request_id, dst_block_ids,
                                 export.layers(), self.engine.cache.spec,
                                 self.spec.kv_timeout_s)
        _, out = await asyncio.gather(push, first)
        if out.finish_reason == "error" or not out.token_ids:
            raise KVTransferError(f"prefill of {request_id} failed: {out.error}")
        return out.token_ids[0]

    def _sender(self, address: str) -> KVSender:
        if address not in self._senders:
            from baton.actors.kv_link import KVSender
            from baton.actors.kv_wire import MIN_GROUP_BYTES

            group = MIN_GROUP_BYTES if self.engine.device.type == "cpu" else 0
            self._senders[address] = KVSender(address, self.spec.kv_token,
                                              min_group_bytes=group)
        return self._senders[address]


def _abort_quietly(engine: HandoffEngine, request_id: str) -> None:
    with contextlib.suppress(BatonError):  # already finished: nothing to free
        engine.abort(request_id)


