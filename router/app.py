"""The router as a Ray actor: gRPC API (and HTTP) in front of a cluster's workers.

`baton up` starts it detached and named; tests start it over a fixed set of workers. Workers come
from the controller (refreshed every second, so replacements and drains take effect without a
restart) or from the handles given. The served model's limits (vocabulary, context) are read
from a worker, so the router refuses exactly what the engine would.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton.actors.model_source import load_tokenizer, resolve
from baton.cluster.state import ClusterState
from baton.errors import ConfigError, WorkerUnavailableError
from baton.router.admin import AdminService
from baton.router.core import Router, RouterLimits, ServedModel
from baton.router.dispatch import Dispatcher
from baton.router.grpc_server import serve
from baton.router.selection import Selection, SelectionSettings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RouterSettings:
    """Where the router listens and what it fronts."""

    model: str = "default"
    host: str = "127.0.0.1"
    grpc_port: int = 50051  # 0: any free port
    http_port: int | None = 8000  # None: no HTTP front end
    token: str | None = None
    tls_cert_file: str | None = None  # PEM certificate chain; with tls_key_file, gRPC over TLS
    tls_key_file: str | None = None
    redis_url: str | None = None
    cluster: str = "default"
    controller: str | None = None  # the controller actor's name; None: fixed workers
    namespace: str = "baton"
    max_in_flight: int = 256
    router_id: str | None = None
    # How requests stream from decode workers: "grpc", each worker's request link (Ray stays
    # for control calls), or "ray", Ray's streaming calls.
    worker_transport: str = "grpc"
    selection: SelectionSettings = field(default_factory=SelectionSettings)


def split_roles(rows: list[dict[str, Any]]) -> tuple[list[Any], list[Any], dict[Any, str]]:
    """(decode handles, prefill handles, decode handle -> pool) from the controller's
    `workers()` rows."""
    live = [r for r in rows if not r.get("draining")]
    decode = [r for r in live if r["role"] in ("decode", "both")]
    return ([r["handle"] for r in decode], [r["handle"] for r in live if r["role"] == "prefill"],
            {r["handle"]: r.get("pool", "default") for r in decode})


class RouterActor:
    """One router: `start()` brings its servers up and returns the bound ports."""

    def __init__(self, settings: RouterSettings, decode: list[Any] | None = None,
                 prefill: list[Any] | None = None):
        self.settings = settings
        self._fixed = (decode or [], prefill or [])
        self.router: Router | None = None
        self._servers: list[Any] = []
        self.ports: dict[str, int] = {}

    async def start(self) -> dict[str, int]:
        import ray

        s = self.settings
        controller = None
        if s.controller:
            controller = ray.get_actor(s.controller, namespace=s.namespace)
            decode, prefill, pool_of = split_roles(await controller.workers.remote())
        else:
            (decode, prefill), pool_of = self._fixed, {}
        if not decode:
            raise WorkerUnavailableError("no decode worker to route to; start a decode pool")
        info = await decode[0].info.remote()
        model = ServedModel(name=info["model"], tokenizer=load_tokenizer(resolve(s.model)),
                            vocab_size=info["vocab_size"], max_model_len=info["max_model_len"])
        state = None
        if s.redis_url:
            state = ClusterState(s.redis_url, s.cluster, background_writes=True)

        async def refresh(ctrl: Any = controller) -> tuple[list[Any], list[Any], dict[Any, str]]:
            return split_roles(await ctrl.workers.remote())

        dispatcher = Dispatcher(decode, prefill, transport=s.worker_transport)
        dispatcher.pool_of = pool_of
        selection = Selection(model.tokenizer, model.vocab_size, state, s.selection)
        self.router = Router(model, dispatcher, state=state, router_id=s.router_id,
                             limits=RouterLimits(max_in_flight=s.max_in_flight),
                             refresh=refresh if controller is not None else None,
                             selection=selection)
        await self.router.learn_pools()
        await dispatcher.connect()
        if state is not None:
            await asyncio.to_thread(selection.load_latest)
        self.router.start()
        tls = None
        if s.tls_cert_file or s.tls_key_file:
            if not (s.tls_cert_file and s.tls_key_file):
                raise ConfigError("TLS needs both tls_cert_file and tls_key_file")
            tls = (Path(s.tls_key_file).read_bytes(), Path(s.tls_cert_file).read_bytes())
        server, port = await serve(self.router, s.host, s.grpc_port,
                                   admin=AdminService(self.router, controller), token=s.token,
                                   tls=tls)
        self._servers.append(server)
        self.ports["grpc"] = port
        if s.http_port is not None:
            self.ports["http"] = await self._start_http(s.http_port)
        log.info("router %s up: %s", self.router.router_id, self.ports)
        return self.ports

    async def _start_http(self, port: int) -> int:
        try:
            from baton.router.http import serve_http
        except ImportError as exc:  # the HTTP front end is optional in this build
            raise ConfigError("this build has no HTTP front end; set http_port to None") from exc
        runner, bound = await serve_http(self.router, self.settings.host, port,
                                         token=self.settings.token)
        self._servers.append(runner)
        return bound

    async def stats(self) -> dict[str, float]:
        return self.router.stats() if self.router else {}

    async def stop(self) -> None:
        import grpc

        for server in self._servers:
            if isinstance(server, grpc.aio.Server):
                await server.stop(5)
            else:  # the HTTP front end's runner
                await server.cleanup()
        self._servers.clear()
        if self.router is not None:
            await self.router.stop()
            if self.router.state is not None:
                self.router.state.close()
