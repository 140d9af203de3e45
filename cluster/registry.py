"""The controller's side of the Redis worker registry: register, heartbeat, deregister.

Calls go to one thread of their own, in order, and the controller never waits for them, so a
slow or absent Redis cannot hold up supervision (`ClusterState` bounds each call and never
raises). Without a Redis URL every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from baton.cluster.config import ClusterConfig
from baton.cluster.replicas import Replica
from baton.cluster.state import ClusterState, WorkerInfo, WorkerLoad
from baton.records import ExpertCacheStatus

log = logging.getLogger(__name__)


class RegistryWriter:
    """Writes the controller's workers into the registry; call from the controller's loop."""

    def __init__(self, config: ClusterConfig, redis_url: str | None) -> None:
        self.state = ClusterState.from_config(config, redis_url) if redis_url else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-registry")
        self._closed = False
        self._beating: asyncio.Future[Any] | None = None

    def register(self, r: Replica) -> None:
        """Add (or update) a worker: role, pool, node, KV address, model; whether it drains."""
        if self.state is None:
            return
        info = WorkerInfo(
            worker_id=r.worker_id, role=r.role, pool=r.pool,
            node=str(r.info.get("node_id") or ""), address=str(r.info.get("kv_address") or ""),
            model=str(r.info.get("model") or ""),
            extra={"pid": r.info.get("pid"), "cpu_affinity": r.info.get("cpu_affinity"),
                   "draining": r.state == "draining"})
        self._submit(self.state.register, info)

    def deregister(self, worker_id: str) -> None:
        if self.state is not None:
            self._submit(self.state.deregister, worker_id)

    def targets(self, targets: dict[str, int]) -> None:
        """Record pools' targets, for a restarted controller to read back."""
        if self.state is not None:
            self._submit(self.state.set_pool_targets, targets)

    async def read_back(self) -> tuple[dict[str, int] | None, set[str], set[str]]:
        """(pools' recorded targets, ids of registered workers, those of them draining), for a
        restarted controller; (None, empty, empty) without Redis or while it is out."""
        state = self.state
        if state is None:
            return None, set(), set()

        def read() -> tuple[dict[str, int] | None, set[str], set[str]]:
            workers = state.workers()
            draining = {w.info.worker_id for w in workers if w.info.extra.get("draining")}
            return state.pool_targets(), {w.info.worker_id for w in workers}, draining
        return await asyncio.get_running_loop().run_in_executor(self._thread, read)

    def heartbeat(self, replicas: list[Replica]) -> None:
        """Beat with each worker's load from its last info, unless the last round is still on
        its way (Redis slow or away)."""
        state = self.state
        if state is None or (self._beating is not None and not self._beating.done()):
            return
        loads = [(r.worker_id, WorkerLoad(
            running=int(r.info.get("num_running", 0)), waiting=int(r.info.get("num_waiting", 0)),
            kv_usage=float(r.info.get("kv_usage", 0.0)),
            expert_cache=ExpertCacheStatus.from_info(r.info),
            extra={"draining": r.state == "draining"})) for r in replicas]

        def beat() -> None:
            for worker_id, load in loads:
                state.heartbeat(worker_id, load)
        self._beating = self._submit(beat)

    async def close(self) -> None:
        """Let the queued writes through (the state's own flush bounds it), then close."""
        if self.state is not None and not self._closed:
            await asyncio.get_running_loop().run_in_executor(self._thread, self.state.close)
        self._closed = True
        self._thread.shutdown(wait=False)

    def _submit(self, fn: Any, *args: Any) -> asyncio.Future[Any] | None:
        if self._closed:
            return None
        future = asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        future.add_done_callback(_log_failure)
        return future


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("registry write failed: %r", future.exception())
