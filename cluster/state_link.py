"""The cluster state's connection to Redis: it never raises, never blocks long, reconnects.

`ClusterState` runs every Redis command through one `RedisLink`: `call` for reads and the
registry, `write` for journal, history and stats writes (queued for a writer thread that
pipelines them when `background_writes` is on). The link keeps the outage state: after a
failure it leaves Redis alone for a backoff, then the next call tries again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry

from baton.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteOp = Callable[[Pipeline], object]

# Redis errors that mean "not reachable now" rather than "this command is wrong".
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


class _Outage:
    """Whether Redis answers, when to try it again, and how many writes were dropped."""

    def __init__(self, backoff_s: float, max_backoff_s: float) -> None:
        self.base, self.cap = backoff_s, max_backoff_s
        self.lock = threading.Lock()
        self.since: float | None = None  # monotonic time the outage began; None: Redis answers
        self.retry_at = 0.0
        self.backoff = backoff_s
        self.dropped = 0
        self.dropped_at_start = 0

    def may_try(self) -> bool:
        with self.lock:
            return self.since is None or time.monotonic() >= self.retry_at

    def drop(self, n: int) -> None:
        with self.lock:
            self.dropped += n

    def ok(self) -> None:
        with self.lock:
            if self.since is None:
                return
            took, lost = time.monotonic() - self.since, self.dropped - self.dropped_at_start
            self.since, self.backoff = None, self.base
        log.info("Redis is back after %.1fs; %d writes were dropped meanwhile", took, lost)

    def failed(self, exc: Exception) -> None:
        with self.lock:
            now = time.monotonic()
            first = self.since is None
            if first:
                self.since, self.backoff, self.dropped_at_start = now, self.base, self.dropped
            else:
                self.backoff = min(self.backoff * 2, self.cap)
            self.retry_at = now + self.backoff
        if first:
            log.warning("Redis unreachable (%s): serving the cached registry, dropping writes "
                        "until it is back", exc)


class RedisLink:
    """A Redis client wrapped so that no call raises a Redis error; see the module doc."""

    def __init__(self, url: str, *, timeout_s: float, backoff_s: float, max_backoff_s: float,
                 background_writes: bool, write_queue: int, name: str) -> None:
        # One quick retry: it reconnects a pooled connection that a Redis restart left stale.
        try:
            self.client = redis.Redis.from_url(
                url, decode_responses=True, socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1))
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL (want redis://:PASSWORD@HOST:PORT/DB): "
                              f"{exc}") from exc
        self._outage = _Outage(backoff_s, max_backoff_s)
        self._refusals: set[str] = set()
        self._queue: queue.Queue[WriteOp | threading.Event | None] | None = None
        self._writer: threading.Thread | None = None
        self._full_logged = False
        if background_writes:
            self._queue = queue.Queue(maxsize=write_queue)
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name=f"baton-state-writer-{name}")
            self._writer.start()

    @property
    def available(self) -> bool:
        """False from a failed call until a call succeeds again."""
        return self._outage.since is None

    @property
    def dropped(self) -> int:
        """Writes not sent: during outages, refused by Redis, or past a full queue."""
        return self._outage.dropped

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (up to `timeout_s`), stop the writer, close the connections."""
        if self._queue is not None and self._writer is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout_s)
            self._writer.join(timeout_s)
            self._queue, self._writer = None, None
        self.client.close()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the writes queued so far were sent (or dropped); False on timeout."""
        if self._queue is None:
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def call(self, op: Callable[[redis.Redis], T], fallback: T, writes: int = 0) -> T:
        """Run `op` against Redis unless an outage's backoff says not yet; never raises."""
        if not self._outage.may_try():
            self._outage.drop(writes)
            return fallback
        try:
            result = op(self.client)
        except UNREACHABLE as exc:
            self._outage.failed(exc)
            self._outage.drop(writes)
            return fallback
        except redis.RedisError as exc:  # Redis answered, but refused: log each kind once
            self._outage.ok()
            self._outage.drop(writes)
            if type(exc).__name__ not in self._refusals:
                self._refusals.add(type(exc).__name__)
                log.warning("Redis refused a cluster-state command: %s", exc)
            return fallback
        self._outage.ok()
        return result

    def write(self, op: WriteOp) -> None:
        """Queue a write for the writer thread, or send it now without a writer."""
        if self._queue is None:
            self.call(functools.partial(self._send, [op]), None, writes=1)
            return
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self._outage.drop(1)
            if not self._full_logged:  # once until the writer catches up
                self._full_logged = True
                log.warning("cluster-state write queue full (Redis too slow): dropping writes")

    @staticmethod
    def _send(ops: list[WriteOp], r: redis.Redis) -> None:
        pipe = r.pipeline(transaction=False)
        for op in ops:
            op(pipe)
        pipe.execute()

    def _write_loop(self) -> None:
        """The writer thread: send queued writes in pipelined batches, in order, until None."""
        assert self._queue is not None
        q, stop = self._queue, False
        while not stop:
            items = [q.get()]
            while len(items) < 256:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            ops: list[WriteOp] = []
            marks: list[threading.Event] = []
            for item in items:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    marks.append(item)
                else:
                    ops.append(item)
            if ops:
                self.call(functools.partial(self._send, ops), None, writes=len(ops))
            if q.empty():
                self._full_logged = False
            for mark in marks:  # after the writes queued before it
                mark.set()
