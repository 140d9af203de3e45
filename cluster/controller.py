"""The cluster controller: a detached, named Ray actor that runs the pools of worker actors.

It starts every pool's replicas from the config, pings each worker every `tick_s` and replaces
the dead (a replacement gets a new worker id and the dead replica's pinned cores), carries out
`scale` and `drain`, and keeps the Redis worker registry (register, heartbeat with load,
deregister). Redis going away costs the registry, never the supervision.

Who calls what: `baton up` calls `start_controller`; routers call `workers()` about once a
second for the handles to send requests to; the admin service and `baton status` call
`status()`, `pools()`, `scale()` and `drain()`; `baton down` calls `stop_controller`.

Restartable: workers are detached, named actors (cluster/adoption.py), so they outlive the
controller; Ray restarts a controller that died (`max_restarts=-1`) and the new one adopts the
live workers (same ids, pinned cores and KV-link token) with the pool targets recorded in Redis,
then starts only what is missing. Until it has, it answers `ClusterNotRunningError` (routers
keep serving on their last worker list). Calls in flight when it dies are not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from baton.actors.worker import Worker
from baton.cluster.adoption import (
    adopt_workers,
    find_live_workers,
    kill_named_workers,
    worker_name,
)
from baton.cluster.config import ClusterConfig
from baton.cluster.pools import actor_options, worker_spec
from baton.cluster.registry import RegistryWriter
from baton.cluster.replicas import PoolReplicas, Replica
from baton.errors import (
    BatonError,
    ClusterNotRunningError,
    ConfigError,
    WorkerNotFoundError,
    WorkerUnavailableError,
)

log = logging.getLogger(__name__)

CONTROLLER_NAME = "baton-controller"
MAX_NAME_TRIES = 8
NAMESPACE = "baton"


class Controller:
    """Creates, supervises, scales and drains a cluster's worker pools (async Ray actor).

    Call `start()` once (`start_controller` does) before anything else. Workers are listed by
    `workers()` only once their model is loaded, and no longer once they drain.
    """

    def __init__(self, config: ClusterConfig, redis_url: str | None = None, *,
                 tick_s: float = 1.0, ping_timeout_s: float = 5.0, max_missed: int = 3,
                 drain_timeout_s: float = 300.0, drain_grace_s: float = 1.0,
                 start_timeout_s: float = 600.0, retry_s: float = 5.0) -> None:
        self.config = config
        self.tick_s, self.ping_timeout_s, self.max_missed = tick_s, ping_timeout_s, max_missed
        # A drained worker stays up at least `drain_grace_s`: a router that read `workers()`
        # just before the drain may still send it a request.
        self.drain_timeout_s, self.drain_grace_s = drain_timeout_s, drain_grace_s
        self.start_timeout_s, self.retry_s = start_timeout_s, retry_s
        self._kv_token = secrets.token_urlsafe(24)  # shared by the workers' KV link, never shown
        self._pools = {p.name: PoolReplicas(p) for p in config.pools}
        self._remote = ray.remote(Worker)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._registry = RegistryWriter(config, redis_url)
        ctx = ray.get_runtime_context()
        self._namespace = ctx.namespace
        self._starting = False
        self._resumed = False  # after a restart: adopted the live workers
        # Ray restarted this controller after it died: adopt the workers it left running. The
        # call to itself may be refused (Ray may not count it alive yet): then the first call
        # from outside (routers ask every second) starts the adoption.
        self._restarted = bool(ctx.was_current_actor_reconstructed)
        if self._restarted:
            ctx.current_actor.resume.remote()

    # --- the interface -------------------------------------------------------------------------

    async def start(self) -> int:
        """Start every pool's replicas and wait until all have loaded their model; then start
        supervising. Raises the first worker's error if one fails to start (WorkerUnavailableError
        if one is not ready within `start_timeout_s`). Returns how many it started."""
        if self._supervisor is not None or self._starting:
            return 0  # started already
        self._starting = True
        if self._restarted:
            await self._adopt()
        else:  # workers of an earlier run of this cluster whose controller is gone
            await asyncio.to_thread(kill_named_workers, self.config.name, self._namespace)
            self._registry.targets({n: p.target for n, p in self._pools.items()})
        launched = [self._launch(p) for p in self._pools.values() for _ in range(p.missing())]
        await asyncio.gather(*(self._await_ready(r, raise_errors=not self._restarted)
                               for r in launched))
        self._supervisor = asyncio.create_task(self._supervise())
        log.info("controller %s up: %s", self.config.name,
                 {n: len(p.replicas) for n, p in self._pools.items()})
        return len(launched)

    async def resume(self) -> None:
        """Take over after Ray restarted this controller (it calls this on itself)."""
        try:
            await self.start()
        except Exception:  # nobody waits on this call: say it here
            log.exception("the restarted controller failed to resume its pools; retrying on "
                          "the next call")
            self._starting = False

    async def _adopt(self) -> None:
        """Adopt the live workers of this cluster, with the pools' targets recorded in Redis
        (see `adopt_workers`); re-drain those registered as draining."""
        # As long to answer as supervision allows before it calls a worker lost.
        live = await find_live_workers(self.config.name, self._namespace,
                                       self.ping_timeout_s * self.max_missed)
        targets, registered, draining = await self._registry.read_back()
        adopted, strays = adopt_workers(self._pools, live, targets, registered)
        for w in strays:
            log.warning("worker %s belongs to no pool of this config; killing it", w.worker_id)
            kill_actor(w.handle)
        # Replacements must share the adopted workers' KV-link token.
        self._kv_token = next((w.spec.kv_token for w in live if w not in strays), self._kv_token)
        for r in adopted:
            self._registry.register(r)
            if r.worker_id in draining:
                self._begin_drain(r, replace=False)
        self._resumed = True
        log.warning("controller %s restarted: adopted %s", self.config.name,
                    sorted(r.worker_id for r in adopted))

    async def workers(self, include_draining: bool = False) -> list[dict[str, Any]]:
        """The workers to send requests to: one entry per ready worker (draining ones too, when
        asked) with worker_id, pool, role, handle and draining."""
        self._check_resumed()
        states = ("ready", "draining") if include_draining else ("ready",)
        return [{"worker_id": r.worker_id, "pool": r.pool, "role": r.role, "handle": r.handle,
                 "draining": r.state == "draining"}
                for p in self._pools.values() for r in p.in_state(*states)]

    async def status(self) -> list[dict[str, Any]]:
        """Every worker's `info()` (asked now) with worker_id, pool, role, state, alive and
        draining. Starting workers carry no info yet; a dead one shows alive False until its
        replacement is ready; one that does not answer now shows its last info."""
        self._check_resumed()
        replicas = [r for p in self._pools.values() for r in p.replicas]
        asked = [r for r in replicas if r.state in ("ready", "draining")]
        answers = await asyncio.gather(*(self._ask(r) for r in asked), return_exceptions=True)
        alive = {r.worker_id: r.state == "starting" for r in replicas}
        for r, answer in zip(asked, answers, strict=True):
            if isinstance(answer, dict):
                r.info = answer
            alive[r.worker_id] = not isinstance(answer, RayActorError) or isinstance(
                answer, ActorUnavailableError)
        return [{**r.info, "worker_id": r.worker_id, "pool": r.pool, "role": r.role,
                 "state": r.state, "alive": alive[r.worker_id], "draining": r.state == "draining"}
                for r in replicas]

    async def pools(self) -> list[dict[str, Any]]:
        """Per pool: target, replicas by state (starting, ready, draining, dead), restarts and
        start failures."""
        return [p.summary() for p in self._pools.values()]

    async def scale(self, pool: str, replicas: int) -> int:
        """Set a pool's target; starts replicas, or drains the least loaded surplus ones (they
        finish their requests, then stop). Unknown pool or impossible count: ConfigError."""
        self._check_resumed()
        p = self._pool(pool)
        p.check_target(replicas)
        p.target = replicas
        self._registry.targets({pool: replicas})
        starting, ready = p.surplus()
        for r in starting:
            self._stop(r, "scaled down before it was ready")
        for r in ready:
            self._begin_drain(r, replace=False)
        log.info("pool %s: target %d replicas", pool, replicas)
        self._reconcile()
        return replicas

    async def drain(self, worker_id: str) -> int:
        """Stop sending a worker requests, stop it once it has none (or after the drain timeout)
        and start a replacement if its pool is then below target. Returns its requests in flight
        now. Unknown (or already stopped) worker: WorkerNotFoundError."""
        self._check_resumed()
        r = self._replica(worker_id)
        if r.state == "starting":
            self._stop(r, "drained before it was ready")
            self._reconcile()
            return 0
        # On no answer its last info tells; supervision deals with a dead worker.
        with contextlib.suppress(TimeoutError, RayActorError):
            r.info = await self._ask(r)
        if r.state == "ready":
            self._begin_drain(r, replace=True)
        return r.in_flight

    async def shutdown(self) -> int:
        """Stop supervising, kill every worker and take them out of the registry; returns how
        many were stopped. The controller answers nothing useful afterwards."""
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for task in list(self._tasks):
            task.cancel()
        stopped = 0
        for p in self._pools.values():
            for r in list(p.replicas):
                stopped += r.state != "dead"
                self._stop(r, "shutdown")
            p.target = 0
        # Detached workers end only when killed: those it had not adopted (yet) too, and it
        # returns once their names are free (a new cluster of this name may start at once).
        await asyncio.to_thread(kill_named_workers, self.config.name, self._namespace, 10.0)
        await self._registry.close()  # after the deregisters queued above
        log.info("controller %s shut down: %d workers stopped", self.config.name, stopped)
        return stopped

    async def settle(self, timeout_s: float = 60.0) -> bool:
        """Wait until every pool is at its target with all replicas ready and none draining or
        dead; False if that did not happen within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not all(p.settled() for p in self._pools.values()):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # --- supervision ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.tick_s)
            try:
                await self._tick()
            except Exception:  # one bad tick must not end supervision
                log.exception("supervision tick failed")

    async def _tick(self) -> None:
        watched = [r for p in self._pools.values() for r in p.in_state("ready", "draining")]
        answers = await asyncio.gather(*(self._ask(r) for r in watched), return_exceptions=True)
        for r, answer in zip(watched, answers, strict=True):
            if isinstance(answer, dict):
                r.info, r.misses = answer, 0
            elif isinstance(answer, TimeoutError | ActorUnavailableError):
                r.misses += 1
                log.warning("worker %s missed a health check (%d in a row)", r.worker_id,
                            r.misses)
                if r.misses >= self.max_missed:
                    self._lost(r, f"no answer to {r.misses} health checks")
            elif isinstance(answer, RayActorError):
                self._lost(r, f"died: {answer}")
            else:
                log.error("health check of %s failed: %r", r.worker_id, answer)
        # Only those that answered: a hung worker drops out of the registry by its TTL.
        self._registry.heartbeat([r for r, answer in zip(watched, answers, strict=True)
                                  if isinstance(answer, dict) and r.state != "dead"])
        self._reconcile()

    def _reconcile(self) -> None:
        """Start what each pool is missing (unless a failed start is backing off); forget dead
        replicas once nothing is left to replace them."""
        if self._closed:
            return
        now = time.monotonic()
        for p in self._pools.values():
            if now >= p.retry_at:
                for _ in range(p.missing()):
                    if p.free_slot() is None:
                        break  # a pinned pool waits for a draining replica to free its cores
                    self._spawn(self._await_ready(self._launch(p)))
            if p.missing() <= 0 and not p.in_state("starting"):
                for r in p.in_state("dead"):
                    p.forget(r)

    def _lost(self, r: Replica, why: str) -> None:
        """A worker died (or stopped answering): kill it, leave the registry, mark it for
        replacement (a scale-down drain is not replaced)."""
        if r.state in ("dead", "starting"):
            return
        log.error("worker %s (pool %s) lost: %s", r.worker_id, r.pool, why)
        kill_actor(r.handle)
        self._registry.deregister(r.worker_id)
        p = self._pools[r.pool]
        if r.state == "draining" and not r.replace:
            p.forget(r)
            return
        r.enter("dead")
        p.restarts += 1

    # --- starting and stopping workers ---------------------------------------------------------

    def _launch(self, p: PoolReplicas) -> Replica:
        slot = p.free_slot()
        if slot is None:
            raise ConfigError(f"pool {p.pool.name!r}: no free cpu_cores for another replica")
        spec = worker_spec(self.config, p.pool, self._kv_token, slot)
        options = {**actor_options(p.pool), "namespace": self._namespace, "lifetime": "detached"}
        for _ in range(MAX_NAME_TRIES):
            worker_id = p.next_id()
            try:
                handle = self._remote.options(
                    **options, name=worker_name(self.config.name, worker_id)).remote(spec)
                break
            except ValueError:  # a dead worker's name Ray has not freed yet: take the next id
                log.warning("worker name for %s still taken; trying the next id", worker_id)
        else:
            raise WorkerUnavailableError(
                f"pool {p.pool.name!r}: no free worker name after {MAX_NAME_TRIES} ids; see "
                f"`ray list actors` for leftover baton-worker/{self.config.name}/ actors")
        r = p.new_replica(handle, slot, worker_id)
        log.info("starting worker %s (pool %s, slot %d)", r.worker_id, r.pool, slot)
        return r

    async def _await_ready(self, r: Replica, raise_errors: bool = False) -> None:
        p = self._pools[r.pool]
        try:
            info = await asyncio.wait_for(r.handle.info.remote(), self.start_timeout_s)
        except Exception as exc:
            if r.state != "starting":
                return  # stopped meanwhile
            p.start_failures += 1
            p.retry_at = time.monotonic() + self.retry_s
            error = _start_error(r, p, exc, self.start_timeout_s)
            log.error("%s", error)
            self._stop(r, "failed to start")
            if raise_errors and error is exc:
                raise
            if raise_errors:
                raise error from exc
        if r.state != "starting":
            return
        r.info = info
        r.enter("ready")
        log.info("worker %s ready (pool %s, pid %s, cores %s)", r.worker_id, r.pool,
                 info.get("pid"), info.get("cpu_affinity"))
        self._registry.register(r)
        for dead in p.in_state("dead")[:1]:
            p.forget(dead)  # replaced
        self._reconcile()

    def _begin_drain(self, r: Replica, replace: bool) -> None:
        r.enter("draining")
        r.replace = replace
        log.info("draining worker %s (%d in flight)", r.worker_id, r.in_flight)
        self._registry.register(r)  # the registry shows it draining
        self._spawn(self._drain(r))

    async def _drain(self, r: Replica) -> None:
        deadline = r.since + self.drain_timeout_s
        while r.state == "draining":
            try:
                r.info = await self._ask(r)
            except (TimeoutError, ActorUnavailableError):
                pass  # supervision decides whether it is lost
            except RayActorError:
                break
            waited = time.monotonic() - r.since
            if r.in_flight == 0 and waited >= self.drain_grace_s:
                break
            if time.monotonic() > deadline:
                log.warning("worker %s still has %d requests after the drain timeout (%.0f s); "
                            "stopping it anyway", r.worker_id, r.in_flight, self.drain_timeout_s)
                break
            await asyncio.sleep(min(0.2, self.tick_s))
        if r.state == "draining":
            self._stop(r, "drained")
            self._reconcile()

    def _stop(self, r: Replica, why: str) -> None:
        log.info("stopping worker %s: %s", r.worker_id, why)
        if r.state != "dead":
            kill_actor(r.handle)
            self._registry.deregister(r.worker_id)
        r.enter("dead")
        self._pools[r.pool].forget(r)

    # --- helpers -------------------------------------------------------------------------------

    def _check_resumed(self) -> None:
        if self._restarted and not self._resumed:
            if not self._starting:
                self._spawn(self.resume())
            raise ClusterNotRunningError(
                f"the controller of cluster {self.config.name!r} is restarting (Ray restarted "
                "it after it died) and has not adopted its workers yet; they keep serving. Try "
                "again in a few seconds")

    def _pool(self, name: str) -> PoolReplicas:
        p = self._pools.get(name)
        if p is None:
            raise ConfigError(f"no pool named {name!r}; pools: {sorted(self._pools)}")
        return p

    def _replica(self, worker_id: str) -> Replica:
        for p in self._pools.values():
            r = p.find(worker_id)
            if r is not None and r.state != "dead":
                return r
        live = sorted(r.worker_id for p in self._pools.values() for r in p.replicas
                      if r.state != "dead")
        raise WorkerNotFoundError(
            f"no live worker {worker_id!r}; live workers: {live} (see `baton status`)")

    async def _ask(self, r: Replica) -> dict[str, Any]:
        return await asyncio.wait_for(r.handle.info.remote(), self.ping_timeout_s)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _start_error(r: Replica, p: PoolReplicas, exc: Exception, timeout_s: float) -> Exception:
    """Why a worker did not start, said for the one who started the cluster: the worker's own
    Baton error when its constructor raised one (a model not found, a bad engine option)."""
    where = f"worker {r.worker_id} (pool {r.pool})"
    if isinstance(exc, TimeoutError):
        wants = {k: v for k, v in actor_options(p.pool).items()
                 if k in ("num_cpus", "num_gpus", "resources")}
        return WorkerUnavailableError(
            f"{where} not ready after {timeout_s:.0f} s: the cluster may lack the resources it "
            f"asks for ({wants}; see `ray status`), or its model loads slowly (raise "
            f"start_timeout_s)")
    task_error = exc.args[0] if isinstance(exc, ActorDiedError) and exc.args else None
    cause = getattr(task_error, "cause", None)
    if isinstance(cause, BatonError):
        with contextlib.suppress(TypeError):  # a subclass with other constructor arguments
            return type(cause)(f"{where} did not start: {cause.message}")
        return cause
    return exc


def kill_actor(handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception as exc:  # already gone
        log.debug("kill: %r", exc)
