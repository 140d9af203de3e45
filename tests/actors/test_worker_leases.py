"""A worker's lease watch: a caller silent for its lease loses its requests, but a stall of the
worker's own loop, during which no renewal could be heard, does not count against it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from baton.actors.worker import Worker

LEASE_S = 0.4


def _worker() -> Worker:
    worker = object.__new__(Worker)  # the watch alone: no engine, no Ray
    worker.spec = SimpleNamespace(caller_lease_s=LEASE_S)
    worker._leased, worker._renewed, worker.lease_expiries = {}, {}, 0
    return worker


async def _leased(worker: Worker) -> asyncio.Task:
    stream = asyncio.create_task(asyncio.sleep(30))
    worker._leased["r1"] = ("router", stream)
    worker._renewed["router"] = time.monotonic()
    return stream


def test_a_silent_caller_loses_its_request() -> None:
    async def scenario() -> bool:
        worker = _worker()
        stream = await _leased(worker)
        watch = asyncio.create_task(worker._expire_leases())
        await asyncio.sleep(3 * LEASE_S)
        await asyncio.gather(watch, return_exceptions=True)
        return stream.cancelled() and worker.lease_expiries == 1

    assert asyncio.run(scenario())


def test_a_stall_of_the_workers_own_loop_does_not_expire_a_lease() -> None:
    async def scenario() -> tuple[bool, int]:
        worker = _worker()
        stream = await _leased(worker)
        watch = asyncio.create_task(worker._expire_leases())
        await asyncio.sleep(0)  # the watch starts its first wait
        time.sleep(2.5 * LEASE_S)  # the loop is blocked: no renewal can arrive
        await asyncio.sleep(0.05)  # the watch runs first, then the caller's queued renewal
        await worker.renew("router")
        await asyncio.sleep(LEASE_S / 2)  # the watch checks again, with the renewal heard
        cancelled = stream.cancelled()
        worker._leased.clear()
        stream.cancel()
        await asyncio.gather(watch, stream, return_exceptions=True)
        return cancelled, worker.lease_expiries

    assert asyncio.run(scenario()) == (False, 0)
