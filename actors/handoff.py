"""The prefill -> decode handoff inside an engine: exporting a prompt's KV as each layer is
computed, and reserving blocks for KV that another worker computes.

Prefill side: `add_export` runs a prompt (max_tokens 1) and, during the step that completes it,
packs each layer's blocks the moment the layer has written them and puts `(layer, payload)` on the
export's feed (a `None` ends the feed), so a `KVSender` ships layer i while layer i+1 computes.

Decode side: `reserve_import` admits a request without scheduling it, takes prefix-cache hits
(those blocks are not sent again) and reserves blocks for the rest; `complete_import` starts
decoding from the first token the prefill worker sampled; `fail_import` frees everything.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from baton.actors.engine import Engine
from baton.actors.kv_transfer import pack_layer
from baton.actors.scheduler import SchedulerOutput
from baton.actors.sequence import Sequence
from baton.errors import CapacityError, RequestNotFoundError
from baton.sampling import SamplingParams


@dataclass(slots=True)
class KVExport:
    """Where a prefill worker sends a prompt's KV: blocks after `skip_blocks`, onto `feed`."""

    skip_blocks: int
    feed: queue.Queue

    def layers(self) -> Iterator[tuple[int, torch.Tensor]]:
        """`(layer, payload)` as the engine computes them, until the feed is closed."""
        while (item := self.feed.get()) is not None:
            yield item


@dataclass(slots=True, frozen=True)
class ImportReservation:
    """Blocks a decode worker reserved for a prompt computed elsewhere."""

    request_id: str
    block_ids: list[int]  # receives the prompt's KV after the cached prefix
    skip_blocks: int  # leading blocks already held (prefix cache): not sent
    num_prompt_tokens: int


class HandoffEngine(Engine):
    """An `Engine` that can hand a prompt's KV over to another engine, or take one over."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._exports: dict[str, KVExport] = {}
        self._feeding: list[str] = []
        self._imports: dict[str, Sequence] = {}

    # -- prefill side -----------------------------------------------------------------------------

    def add_export(self, prompt: list[int], params: SamplingParams, skip_blocks: int,
                   request_id: str | None = None) -> tuple[str, KVExport]:
        """Compute `prompt` for another worker; its first token comes back as a normal output."""
        params = dataclasses.replace(params, max_tokens=1, method="none")
        export = KVExport(skip_blocks, queue.Queue())
        rid = self.add_request(prompt, params, request_id)
        self._exports[rid] = export
        return rid, export

    def _layer_hook(self, sched: SchedulerOutput) -> Callable[[int], None] | None:
        ready = []
        for seq in sched.seqs:
            export = self._exports.get(seq.request_id)
            n = sched.num_scheduled_tokens[seq.request_id]
            if export is not None and seq.num_computed_tokens + n == seq.num_prompt_tokens:
                ready.append((export, torch.tensor(seq.block_table[export.skip_blocks :])))
                self._feeding.append(seq.request_id)
        if not ready:
            return None

        def hook(layer: int) -> None:
            for export, src in ready:
                export.feed.put((layer, pack_layer(self.cache, layer, src)))

        return hook

    def _forward_done(self, sched: SchedulerOutput) -> None:
        # Every layer of these prompts went onto their feeds (or the step failed): close them.
        for rid in self._feeding:
            self._exports.pop(rid).feed.put(None)
        self._feeding = []

    # -- decode side ------------------------------------------------------------------------------

    def reserve_import(self, prompt: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> ImportReservation:
        """Admit a request whose prompt another worker computes; raises `CapacityError` when
        its blocks cannot be reserved now (the caller may prefill locally or retry)."""
        seq = self._new_sequence(prompt, params, request_id)
        cached = self.blocks.match_prefix(seq)
        uncached = len(seq) - len(cached) * self.blocks.block_size
        if not self.blocks.allocate_slots(seq, uncached, cached):
            self._forget(seq)
            raise CapacityError(f"no KV blocks free for a {len(seq)}-token prompt; retry later")
        self._imports[seq.request_id] = seq
        return ImportReservation(seq.request_id, seq.block_table[len(cached) :], len(cached),
                                 len(seq))

    def uncached_tokens(self, prompt_ids: list[int]) -> int:
        """Prompt tokens this engine would have to compute (the rest are prefix-cache hits)."""
        probe = Sequence("probe", prompt_ids, SamplingParams(max_tokens=1))
        return len(prompt_ids) - len(self.blocks.match_prefix(probe)) * self.blocks.block_size

    def complete_import(self, request_id: str, first_token: int, kv_bytes: int = 0) -> None:
        """The prompt's KV (`kv_bytes` of it) has landed intact: decode on from `first_token`."""
        seq = self._take_import(request_id)
        seq.metrics.prefill_path = "disaggregated"
        seq.metrics.kv_bytes_received = kv_bytes
        seq.num_computed_tokens = len(seq)
        self.blocks.commit(seq)
        seq.metrics.first_scheduled = seq.metrics.first_scheduled or time.monotonic()
        self.scheduler.add_running(seq)
        self._pending.append(self._emit(seq, [first_token], [None], time.monotonic()))

    def fail_import(self, request_id: str, reason: str) -> None:
        """The handoff failed: free the reservation and end the request with `reason`."""
        seq = self._take_import(request_id)
        seq.error = reason
        self.scheduler.finish(seq, "error")
        self._pending.append(self._finish_output(seq))

    def cancel_import(self, request_id: str) -> Sequence:
        """Drop a reservation silently (the caller will prefill the request another way)."""
        seq = self._take_import(request_id)
        self._forget(seq)
        return seq

    def abort(self, request_id: str) -> None:
        if request_id in self._imports:
            self.fail_import(request_id, "aborted")
            self._pending[-1].finish_reason = "abort"
            return
        export = self._exports.pop(request_id, None)
        if export is not None:
            export.feed.put(None)
        super().abort(request_id)

    def _take_import(self, request_id: str) -> Sequence:
        seq = self._imports.pop(request_id, None)
        if seq is None:
            raise RequestNotFoundError(f"no reservation for request {request_id!r}")
        return seq

    def _forget(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self._forget_request(seq.request_id)

    def _live(self) -> list[Sequence]:
        return [*super()._live(), *self._imports.values()]
