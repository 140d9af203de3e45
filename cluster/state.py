"""The cluster's shared state in Redis: worker registry, request journal, history, router stats.

Who calls what:
- the controller (or each worker) calls `register`, `heartbeat` every few seconds, `deregister`;
- the router reads `workers()` (to pick workers), writes `accepted` / `finished` / `failed` and
  `record` (performance history) per request, and `update_router_stats` now and then;
- the method selector reads `history()`; the CLI reads `workers()`, `events()`, `router_stats()`.

Losing Redis degrades, it never stops the caller: no call raises a Redis error. While Redis is
unreachable, writes are dropped (counted in `dropped_writes`, logged once per outage), the
registry is served from the last view read, and other reads return nothing. A call gives up
after about 2 x `timeout_s` (one retry, for a connection a Redis restart left stale). After a
failure Redis is left alone for a backoff (doubling up to `max_backoff_s`): calls meanwhile
return at once; then the next call tries again, and a success ends the outage. Nothing is
buffered across an outage: the history is a learning signal, and a gap in it costs little.

Sync, not asyncio, on purpose: the asyncio router creates this with `background_writes=True`,
so its per-request writes are a queue put (a writer thread pipelines them to Redis) and never
touch the event loop; its reads (`workers()`, once a second or so) go through
`asyncio.to_thread`. One implementation of the outage logic serves the router, the controller
and the CLI alike.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any, TypeVar, cast

import redis
from pydantic import BaseModel, ValidationError
from redis.client import Pipeline

from baton.cluster.config import ClusterConfig
from baton.cluster.state_link import RedisLink
from baton.errors import ConfigError
from baton.records import (
    JournalEvent,
    JournalKind,
    PerfRecord,
    WorkerInfo,
    WorkerLoad,
    WorkerStatus,
)

__all__ = ["ClusterState", "JournalEvent", "JournalKind", "PerfRecord", "WorkerInfo",
           "WorkerLoad", "WorkerStatus"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Rows = list[tuple[str, dict[str, str]]]  # stream entries: (id, fields)


class ClusterState:
    """One cluster's shared state in Redis, under keys `baton:<cluster>:...`; see module doc.

    Thread-safe. `close()` flushes queued writes and closes the connections.
    """

    def __init__(self, url: str, cluster: str = "default", *, heartbeat_ttl_s: float = 10.0,
                 journal_maxlen: int = 100_000, history_maxlen: int = 100_000,
                 stats_ttl_s: float = 86_400.0, timeout_s: float = 0.5, backoff_s: float = 0.5,
                 max_backoff_s: float = 5.0, background_writes: bool = False,
                 write_queue: int = 10_000) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", cluster):
            raise ConfigError(f"cluster name {cluster!r}: use letters, digits, '_', '.', '-'")
        self.cluster = cluster
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.journal_maxlen, self.history_maxlen = journal_maxlen, history_maxlen
        self.stats_ttl_s = stats_ttl_s
        self._link = RedisLink(url, timeout_s=timeout_s, backoff_s=backoff_s,
                               max_backoff_s=max_backoff_s, background_writes=background_writes,
                               write_queue=write_queue, name=cluster)
        self._known: dict[str, WorkerInfo] = {}  # workers registered through this instance
        self._cached_workers: list[WorkerStatus] = []
        self.ping()

    @classmethod
    def from_config(cls, config: ClusterConfig, url: str, **options: Any) -> ClusterState:
        """State for this cluster at `url` (the external one, or the local server's), with the
        config's TTL and stream bounds; `options` as for the constructor."""
        r = config.redis
        return cls(url, config.name, heartbeat_ttl_s=r.heartbeat_ttl_s,
                   journal_maxlen=r.journal_maxlen, history_maxlen=r.history_maxlen, **options)

    # --- health ---

    @property
    def available(self) -> bool:
        """False while an outage is on: Redis failed and has not answered since."""
        return self._link.available

    @property
    def dropped_writes(self) -> int:
        """Writes lost to outages (or to a full write queue) since this instance was made."""
        return self._link.dropped

    def ping(self) -> bool:
        """Ask Redis now (unless inside an outage's backoff); True if it answered."""
        return self._link.call(lambda r: bool(r.ping()), False)

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush queued writes (up to `timeout_s`), stop the writer, close the connections."""
        self._link.close(timeout_s)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every write queued so far reached Redis (or was dropped); False on timeout."""
        return self._link.flush(timeout_s)

    # --- worker registry ---

    def register(self, info: WorkerInfo) -> bool:
        """Add a worker (or replace its info); it stays live for `heartbeat_ttl_s` per beat."""
        self._known[info.worker_id] = info
        return self._beat(info.worker_id, {"info": info.model_dump_json()})

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        """Refresh a worker's liveness and load; False if the registry does not show it live.

        A worker registered through this instance is written back whole, so it reappears by
        itself after an outage or a Redis restart; others must `register` again on False.
        """
        fields = {"load": load.model_dump_json()}
        if worker_id in self._known:
            fields["info"] = self._known[worker_id].model_dump_json()
        return self._beat(worker_id, fields)

    def deregister(self, worker_id: str) -> None:
        """Remove a worker now (drained or stopped) rather than waiting for its TTL."""
        self._known.pop(worker_id, None)
        self._cached_workers = [w for w in self._cached_workers if w.info.worker_id != worker_id]

        def op(r: redis.Redis) -> None:
            pipe = r.pipeline()
            pipe.delete(self._key("worker", worker_id))
            pipe.srem(self._key("workers"), worker_id)
            pipe.execute()
        self._link.call(op, None, writes=1)

    def workers(self, pool: str | None = None) -> list[WorkerStatus]:
        """Live workers (heartbeat within the TTL), by id; the last view read if Redis is out."""
        def op(r: redis.Redis) -> list[WorkerStatus]:
            index = self._key("workers")
            ids = self._members(r, index)
            pipe = r.pipeline(transaction=False)
            for worker_id in ids:
                pipe.hgetall(self._key("worker", worker_id))
            live, gone = [], []
            for worker_id, row in zip(ids, pipe.execute(), strict=True):
                status = self._parse_worker(row) if "info" in row else None
                if status is None:
                    gone.append(worker_id)
                else:
                    live.append(status)
            if gone:  # expired: drop from the index (a later heartbeat adds it back)
                r.srem(index, *gone)
            self._cached_workers = live
            return live

        found = self._link.call(op, None)
        seen = self._cached_workers if found is None else found
        return [w for w in seen if pool is None or w.info.pool == pool]

    def set_pool_targets(self, targets: Mapping[str, int]) -> None:
        """Record pools' target replica counts (the controller's, read back after a restart)."""
        key = self._key("targets")
        self._link.call(lambda r: r.hset(key, mapping=dict(targets)), None, writes=1)

    def pool_targets(self) -> dict[str, int] | None:
        """Pools' recorded target replica counts; None while Redis is out."""
        return self._link.call(
            lambda r: {k: int(v) for k, v in r.hgetall(self._key("targets")).items()}, None)

    # --- request journal ---

    def accepted(self, request_id: str, **detail: Any) -> None:
        """Journal: the router took the request (pool, workers, method in `detail`)."""
        self._journal(JournalEvent(request_id=request_id, event="accepted", detail=detail))

    def finished(self, request_id: str, **detail: Any) -> None:
        """Journal: the request ended normally (finish reason, token counts in `detail`)."""
        self._journal(JournalEvent(request_id=request_id, event="finished", detail=detail))

    def failed(self, request_id: str, reason: str, **detail: Any) -> None:
        """Journal: the request ended with an error; `reason` says which and why."""
        self._journal(JournalEvent(request_id=request_id, event="failed", reason=reason,
                                   detail=detail))

    def events(self, limit: int = 100) -> list[JournalEvent]:
        """The latest `limit` journal events, oldest first; [] while Redis is out."""
        return self._read_stream("journal", JournalEvent, limit)

    def request_events(self, request_id: str, scan: int = 10_000) -> list[JournalEvent]:
        """One request's events, oldest first, looked for among the latest `scan` events."""
        return [e for e in self.events(scan) if e.request_id == request_id]

    # --- performance history ---

    def record(self, rec: PerfRecord) -> None:
        """Append one finished request's outcome to the history (bounded to `history_maxlen`)."""
        self._append("history", rec, self.history_maxlen)

    def history(self, limit: int = 1000, since: float | None = None) -> list[PerfRecord]:
        """Records oldest first: the latest `limit`, or the first `limit` stored at or after
        `since` (unix time, by Redis's clock). [] while Redis is out."""
        if since is None:
            return self._read_stream("history", PerfRecord, limit)
        key, start = self._key("history"), str(int(since * 1000))
        rows: Rows = self._link.call(
            lambda r: cast(Rows, r.xrange(key, min=start, count=limit)), [])
        return self._parse_rows(rows, PerfRecord)

    # --- method selector ---

    def save_selector_model(self, blob: bytes, **info: Any) -> int | None:
        """Store a trained selector model as the next version; its version, or None if Redis
        is out (the caller keeps its model)."""
        key = self._key("selector")

        def op(r: redis.Redis) -> int:
            version = int(r.hincrby(key, "version", 1))
            r.hset(key, mapping={"blob": base64.b64encode(blob).decode(), "saved": time.time(),
                                 "info": json.dumps({**info, "version": version}),
                                 "stored_version": version})
            return version
        return self._link.call(op, None, writes=1)

    def selector_version(self) -> int | None:
        """The stored selector model's version (0: none yet); None while Redis is out."""
        return self._link.call(
            lambda r: int(r.hget(self._key("selector"), "stored_version") or 0), None)

    def selector_model(self) -> tuple[int, bytes, dict[str, Any]] | None:
        """(version, model bytes, info) of the stored selector model; None if none or out."""
        def op(r: redis.Redis) -> tuple[int, bytes, dict[str, Any]] | None:
            row = r.hgetall(self._key("selector"))
            if "blob" not in row:
                return None
            return (int(row["stored_version"]), base64.b64decode(row["blob"]),
                    json.loads(row.get("info", "{}")))
        return self._link.call(op, None)

    def set_quality(self, pool: str, agreement: float) -> None:
        """A lossy pool's measured token agreement with full precision, 0..1."""
        self._link.write(lambda pipe: pipe.hset(self._key("quality"), pool, agreement))

    def quality(self) -> dict[str, float]:
        """Measured agreement of each lossy pool ({} while Redis is out)."""
        return self._link.call(lambda r: {k: float(v) for k, v in
                                          r.hgetall(self._key("quality")).items()}, {})

    def try_lock(self, name: str, ttl_s: float) -> bool:
        """Take a cluster-wide lock for `ttl_s` (it expires, never released early); False if
        another holder has it or Redis is out."""
        key = self._key("lock", name)
        return self._link.call(lambda r: bool(r.set(key, time.time(), nx=True,
                                                    px=int(ttl_s * 1000))), False)

    # --- router stats ---

    def update_router_stats(self, router_id: str, counters: Mapping[str, int] | None = None,
                            gauges: Mapping[str, float] | None = None) -> None:
        """Add to a router's counters and set its gauges (kept `stats_ttl_s` after the last)."""
        key, ttl_ms = self._key("router", router_id), int(self.stats_ttl_s * 1000)
        now = time.time()

        def op(pipe: Pipeline) -> None:
            for name, n in (counters or {}).items():
                pipe.hincrby(key, name, n)
            fields: dict[Any, Any] = {**(gauges or {}), "updated": now}
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, ttl_ms)
            pipe.sadd(self._key("routers"), router_id)
        self._link.write(op)

    def router_stats(self) -> dict[str, dict[str, float]]:
        """Every router's counters and gauges (and `updated`, unix time), by router id."""
        def op(r: redis.Redis) -> dict[str, dict[str, float]]:
            ids = self._members(r, self._key("routers"))
            pipe = r.pipeline(transaction=False)
            for router_id in ids:
                pipe.hgetall(self._key("router", router_id))
            stats = {i: {k: float(v) for k, v in row.items()}
                     for i, row in zip(ids, pipe.execute(), strict=True) if row}
            if gone := [i for i in ids if i not in stats]:
                r.srem(self._key("routers"), *gone)
            return stats
        return self._link.call(op, {})

    # --- internals ---

    def _key(self, *parts: str) -> str:
        return ":".join(("baton", self.cluster, *parts))

    def _beat(self, worker_id: str, fields: dict[str, str]) -> bool:
        key, ttl_ms = self._key("worker", worker_id), int(self.heartbeat_ttl_s * 1000)

        def op(r: redis.Redis) -> bool:
            pipe = r.pipeline()  # MULTI: never a half-written worker
            mapping: dict[Any, Any] = {**fields, "seen": time.time()}
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, ttl_ms)
            pipe.sadd(self._key("workers"), worker_id)
            pipe.hexists(key, "info")
            return bool(pipe.execute()[-1])
        return self._link.call(op, False, writes=1)

    def _parse_worker(self, row: dict[str, str]) -> WorkerStatus | None:
        try:
            info = WorkerInfo.model_validate_json(row["info"])
            load = WorkerLoad.model_validate_json(row["load"]) if "load" in row else None
            return WorkerStatus(info=info, load=load, last_seen=float(row.get("seen", 0.0)))
        except (ValidationError, ValueError) as exc:
            log.warning("skipping unreadable worker record: %s", exc)
            return None

    def _journal(self, event: JournalEvent) -> None:
        self._append("journal", event, self.journal_maxlen)

    def _append(self, stream: str, rec: BaseModel, maxlen: int) -> None:
        key, body = self._key(stream), rec.model_dump_json()
        self._link.write(lambda pipe: pipe.xadd(key, {"r": body}, maxlen=maxlen, approximate=True))

    def _read_stream(self, stream: str, model: type[M], limit: int) -> list[M]:
        key = self._key(stream)
        rows: Rows = self._link.call(lambda r: cast(Rows, r.xrevrange(key, count=limit)), [])
        return self._parse_rows(rows[::-1], model)

    @staticmethod
    def _parse_rows(rows: Rows, model: type[M]) -> list[M]:
        out = []
        for stream_id, fields in rows:
            try:
                out.append(model.model_validate_json(fields["r"]))
            except (KeyError, ValidationError) as exc:
                log.warning("skipping unreadable %s %s: %s", model.__name__, stream_id, exc)
        return out

    @staticmethod
    def _members(r: redis.Redis, key: str) -> list[str]:
        return sorted(str(m) for m in r.smembers(key))
