"""Where a batch's rows run: the `Backend` interface, and a cluster's router over gRPC.

The other backend, the job's own Ray worker actors, is in `batch_workers` (it brings torch).
Backends raise a `baton.errors` type per row. `WorkerUnavailableError` (a worker died, the router is
unreachable) and `CapacityError` (queues full) are worth another attempt; the runner decides how
many. Any other error is the row's own (a prompt too long for the model, ...).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from baton.client import AsyncBatonClient
from baton.ops.batch_output import Generation
from baton.ops.batch_rows import BatchRow

log = logging.getLogger(__name__)


def sampling_kwargs(row: BatchRow) -> dict[str, Any]:
    """The row's sampling parameters as `baton.client` keyword arguments."""
    p = row.request.params
    return {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
            "top_k": p.top_k, "seed": p.seed, "stop": p.stop, "stop_token_ids": p.stop_token_ids,
            "ignore_eos": p.ignore_eos, "method": p.method,
            "num_speculative_tokens": p.num_speculative_tokens, "allow_lossy": p.allow_lossy,
            "disable_exploration": p.disable_exploration}


class Backend(Protocol):
    """What the runner calls: `start` once, `generate` per row attempt (concurrently), `close`."""

    async def start(self) -> None: ...

    async def generate(self, row: BatchRow, request_id: str) -> Generation: ...

    async def close(self) -> None: ...


class RouterBackend:
    """Rows sent to a running cluster's router (`baton up`, or the chart's router Service)."""

    def __init__(self, address: str, token: str | None):
        self.address = address
        self._token = token
        self._client: AsyncBatonClient | None = None
        self._model = ""

    async def start(self) -> None:
        self._client = AsyncBatonClient(self.address, token=self._token)
        models = await self._client.models()  # fails early with the router's own error
        self._model = models[0] if models else ""
        log.info("sending rows to the router at %s (model %s)", self.address, self._model)

    async def generate(self, row: BatchRow, request_id: str) -> Generation:
        assert self._client is not None, "start() first"
        req = row.request
        done = await self._client.complete(req.prompt, request_id=request_id,
                                           model=req.model or "", **sampling_kwargs(row))
        return Generation(done.text, done.finish_reason, done.prompt_tokens,
                          done.completion_tokens, req.model or self._model)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
