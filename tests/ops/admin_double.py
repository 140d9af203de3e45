"""Test double: a router's Admin gRPC service (from the generated stubs) on loopback.

A real router needs Ray and workers; `baton k8s` only needs what its Admin service answers, so
this double serves fixed workers, checks the bearer token the way the router does, and records
the drain and scale calls it gets.
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from baton.protos import baton_pb2 as pb
from baton.protos import baton_pb2_grpc as pb_grpc


@dataclass
class AdminDouble(pb_grpc.AdminServicer):
    token: str
    workers: list[pb.WorkerStatus] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    server: Any = None
    port: int = 0

    def _check(self, context: grpc.ServicerContext) -> None:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API token")

    def ClusterStatus(self, request, context):  # noqa: N802
        self._check(context)
        return pb.ClusterStatusResponse(workers=self.workers, queue_depth=3, in_flight=7,
                                        ttft_p50_s=0.120, ttft_p99_s=0.480, tpot_p50_s=0.020,
                                        tpot_p99_s=0.050, state_available=True)

    def DrainWorker(self, request, context):  # noqa: N802
        self._check(context)
        self.calls.append(("drain", request.worker_id))
        if request.worker_id not in {w.worker_id for w in self.workers}:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no worker {request.worker_id!r}")
        return pb.DrainWorkerResponse(in_flight=2)

    def ScalePool(self, request, context):  # noqa: N802
        self._check(context)
        self.calls.append(("scale", (request.pool, request.replicas)))
        return pb.ScalePoolResponse(replicas=request.replicas)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> AdminDouble:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_AdminServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)


def worker(worker_id: str, pool: str, role: str, running: int = 1,
           expert_cache: pb.ExpertCacheStatus | None = None) -> pb.WorkerStatus:
    """A ready worker; with `expert_cache`, one serving an offloaded MoE model."""
    return pb.WorkerStatus(worker_id=worker_id, pool=pool, role=role, alive=True,
                           state="ready", num_running=running, kv_usage=0.25,
                           expert_cache=expert_cache)


# 3 of 4 expert uses hit, 4 MiB of experts loaded, half a second stalled.
MOE_CACHE = pb.ExpertCacheStatus(hits=300, misses=100, hit_rate=0.75, bytes_loaded=4 * 2**20,
                                 stall_seconds=0.5)
