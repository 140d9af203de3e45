"""`baton.v1.Admin`: what the `baton` CLI asks a router (status, drain, scale, router stats).

Status, drain and scale go to the cluster's controller when there is one; without it (a router
over a fixed set of workers) status asks the workers directly and drain/scale are refused.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from ray.exceptions import RayActorError

from baton.errors import ClusterNotRunningError, ConfigError, as_baton_error
from baton.protos import baton_pb2 as pb
from baton.protos import baton_pb2_grpc as pb_grpc
from baton.records import ExpertCacheStatus
from baton.router.core import Router

log = logging.getLogger(__name__)
INFO_TIMEOUT_S = 5.0


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    err = as_baton_error(exc)
    if err is None:
        raise exc
    await context.abort(getattr(grpc.StatusCode, err.grpc_status), str(err.args[0]))


def worker_status(row: dict[str, Any]) -> pb.WorkerStatus:
    """A worker's row (its `info()` plus the controller's view) as the Admin service sends it;
    `expert_cache` only for a worker serving an offloaded MoE model."""
    experts = ExpertCacheStatus.from_info(row)
    return pb.WorkerStatus(
        expert_cache=pb.ExpertCacheStatus(**experts.model_dump()) if experts else None,
        worker_id=str(row.get("worker_id", "")), pool=str(row.get("pool", "")),
        role=str(row.get("role", "")), node_id=str(row.get("node_id", "")),
        alive=bool(row.get("alive", True)), draining=bool(row.get("draining", False)),
        num_running=int(row.get("num_running", 0)), num_waiting=int(row.get("num_waiting", 0)),
        kv_usage=float(row.get("kv_usage", 0.0)), handoffs=int(row.get("handoffs", 0)),
        handoff_failures=int(row.get("handoff_failures", 0)),
        state=str(row.get("state") or ("ready" if row.get("alive", True) else "dead")))


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, router: Router, controller: Any = None):
        self.router = router
        self.controller = controller

    async def _call_controller(self, method: str, *args: Any) -> Any:
        """A controller call; its death (Ray restarts it) said as what to do, not Ray's text."""
        try:
            return await getattr(self.controller, method).remote(*args)
        except RayActorError as exc:
            raise ClusterNotRunningError(
                "the cluster's controller is not running: Ray is restarting it (its workers keep "
                "serving); try again in a few seconds. If this persists, see `ray status` and "
                "the controller's log, or restart the cluster (`baton down`, `baton up`)"
            ) from exc

    async def _workers(self) -> list[dict[str, Any]]:
        if self.controller is not None:
            return await self._call_controller("status")
        rows = []
        for i, w in enumerate(self.router.dispatcher.workers()):
            try:
                info = await asyncio.wait_for(w.info.remote(), INFO_TIMEOUT_S)
                rows.append({"worker_id": f"worker-{i}", "alive": True, **info})
            except Exception:  # noqa: BLE001 - a dead worker shows as not alive
                rows.append({"worker_id": f"worker-{i}", "alive": False})
        return rows

    async def ClusterStatus(self, request: pb.ClusterStatusRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> pb.ClusterStatusResponse:
        try:
            rows = await self._workers()
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)
        stats = self.router.stats()
        r = self.router
        return pb.ClusterStatusResponse(
            workers=[worker_status(row) for row in rows],
            queue_depth=sum(int(row.get("num_waiting", 0)) for row in rows),
            in_flight=r.in_flight,
            ttft_p50_s=stats.get("ttft_p50_s", 0.0), ttft_p99_s=stats.get("ttft_p99_s", 0.0),
            tpot_p50_s=stats.get("tpot_p50_s", 0.0), tpot_p99_s=stats.get("tpot_p99_s", 0.0),
            state_available=bool(r.state is not None and r.state.available))

    async def DrainWorker(self, request: pb.DrainWorkerRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.DrainWorkerResponse:
        n = await self._ask_controller(context, "drain", request.worker_id)
        return pb.DrainWorkerResponse(in_flight=n)

    async def ScalePool(self, request: pb.ScalePoolRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> pb.ScalePoolResponse:
        n = await self._ask_controller(context, "scale", request.pool, request.replicas)
        return pb.ScalePoolResponse(replicas=n)

    async def RouterStats(self, request: pb.RouterStatsRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.RouterStatsResponse:
        return pb.RouterStatsResponse(stats=self.router.stats())

    async def _ask_controller(self, context: grpc.aio.ServicerContext, method: str,
                              *args: Any) -> Any:
        """Call a controller method, then refresh the router's workers (the set changed)."""
        try:
            if self.controller is None:
                raise ConfigError(f"this router serves a fixed set of workers; {method} needs "
                                  "a cluster started with `baton up`")
            result = await self._call_controller(method, *args)
        except Exception as exc:  # noqa: BLE001 - a typed error becomes its status
            await _abort(context, exc)
        await self.router.refresh_now()
        return result
