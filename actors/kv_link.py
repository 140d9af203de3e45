"""The KV link: prefill workers push KV layer by layer over gRPC into a decode worker's blocks.

The receiver (`KVReceiver`, one per decode worker) accepts a push only for a transfer it was
told to expect (`expect`): same request, the very block ids it reserved, the cache's dtype and
shape, within a deadline, with the shared token in every call's metadata. A transfer is a series
of unary Push calls, a few in flight at once, each carrying one chunk of a group of consecutive
layers as raw bytes (see `kv_wire`) with a CRC32C of its bytes. Layers land in the cache as soon
as their group's last chunk arrives, so a sender can stream early layers while later ones are
still being computed. Anything wrong refuses the call with a status that says what and fails the
whole transfer (its later calls are refused too), and the transfer's waiter gets a
`KVTransferError`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
import numpy as np
import torch

from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.actors.kv_transfer import (
    DTYPE_NAMES,
    pack_layers,
    payload_nbytes,
    payload_shape,
    unpack_layers,
)
from baton.actors.kv_wire import (
    CHUNK_BYTES,
    IN_FLIGHT,
    MAX_IN_FLIGHT,
    MAX_MESSAGE_BYTES,
    PUSH_METHOD,
    SERVICE,
    TOKEN_HEADER,
    TRANSFER_HEADER,
    checksum,
    decode,
    encode,
    end_frame,
    group_size,
    ready_groups,
)
from baton.errors import ConfigError, KVTransferError
from baton.protos.kv_link_pb2 import KVChunk, PushResult

log = logging.getLogger(__name__)

FORGOTTEN_KEPT = 1024  # ended transfers remembered, so that their late chunks get a clear answer


@dataclass(slots=True)
class _Group:
    """A layer group cut across chunks, while its chunks arrive (in any order)."""

    num_layers: int
    total: int
    buffer: np.ndarray  # uint8, `total` bytes
    offsets: set[int] = field(default_factory=set)
    received: int = 0


@dataclass(slots=True)
class Transfer:
    """What a receiver expects for one transfer, and how it is going (shared by its calls)."""

    transfer_id: str
    request_id: str
    block_ids: list[int]
    deadline: float
    block_tensor: torch.Tensor = field(init=False)
    layers_done: set[int] = field(default_factory=set)
    claimed: set[int] = field(default_factory=set)  # layers whose group has begun (or landed)
    groups: dict[int, _Group] = field(default_factory=dict)  # cut groups by first layer
    calls: int = 0  # Push calls that reached it
    bytes_received: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.block_tensor = torch.tensor(self.block_ids)


class KVReceiver:
    """gRPC KVLink server writing pushed KV into `cache` (run by a decode worker)."""

    def __init__(self, cache: PagedKVCache, token: str, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 16):
        self.cache = cache
        self.token = token
        self._transfers: dict[str, Transfer] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # transfer id -> why it ended
        self._lock = threading.Lock()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-recv"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        # Bytes in, bytes out: the frame reaches `_push` as gRPC hands it over.
        handler = grpc.unary_unary_rpc_method_handler(self._push)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Push": handler}),))
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.address = f"{host}:{self.port}"
        self._server.start()

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace)

    # -- decode-worker side -----------------------------------------------------------------------

    def expect(self, transfer_id: str, request_id: str, block_ids: list[int],
               timeout_s: float) -> Transfer:
        """Register a transfer before asking a prefill worker to push it."""
        t = Transfer(transfer_id, request_id, list(block_ids), time.monotonic() + timeout_s)
        with self._lock:
            self._transfers[transfer_id] = t
            self._ended.pop(transfer_id, None)
        return t

    def wait(self, transfer_id: str) -> Transfer:
        """Block until the transfer completed; raise `KVTransferError` if it failed or stalled."""
        t = self._transfers[transfer_id]
        remaining = t.deadline - time.monotonic()
        if not t.done.wait(max(remaining, 0)):
            self._fail(t, f"transfer {transfer_id} did not complete within its deadline")
        self.forget(transfer_id)
        if t.error:
            raise KVTransferError(t.error)
        return t

    def forget(self, transfer_id: str) -> None:
        """Stop accepting chunks for a transfer (finished, failed, or given up on); a push of
        it still under way is refused from its next chunk on (its blocks may be freed now)."""
        with self._lock:
            t = self._transfers.pop(transfer_id, None)
        if t is None:
            return
        if not t.done.is_set():
            self._fail(t, f"transfer {transfer_id} was given up on by the receiver")
        with self._lock:
            self._ended[transfer_id] = t.error or f"transfer {transfer_id} has already completed"
            while len(self._ended) > FORGOTTEN_KEPT:
                self._ended.popitem(last=False)

    # -- gRPC side --------------------------------------------------------------------------------

    def _push(self, message: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        if metadata.get(TOKEN_HEADER) != self.token:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong KV link token")
        try:
            header, payload = decode(message)
        except KVTransferError as exc:  # the transfer the call names cannot complete now
            with self._lock:
                named = self._transfers.get(str(metadata.get(TRANSFER_HEADER, "")))
            if named is not None:
                self._fail(named, exc.message)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        try:
            transfer = self._lookup(header.transfer_id)
        except KVTransferError as exc:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        try:
            with transfer.lock:
                transfer.calls += 1
            if header.end:
                self._end(transfer, header)
                return PushResult(transfer_id=transfer.transfer_id).SerializeToString()
            layers = self._accept(transfer, header, payload)
        except KVTransferError as exc:
            self._fail(transfer, exc.message)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except Exception as exc:  # a bug here must still fail the transfer, not leave it waiting
            log.exception("KV link receiver failed on transfer %s", transfer.transfer_id)
            self._fail(transfer, f"the receiver failed: {type(exc).__name__}: {exc}")
            _refuse(context, grpc.StatusCode.INTERNAL, transfer.error or "receiver failed")
        return PushResult(transfer_id=transfer.transfer_id, layers_received=layers,
                          bytes_received=len(payload)).SerializeToString()

    def _lookup(self, transfer_id: str) -> Transfer:
        with self._lock:
            t = self._transfers.get(transfer_id)
            ended = self._ended.get(transfer_id)
        if t is None:
            raise KVTransferError(ended or f"no transfer {transfer_id!r} is expected here")
        return t

    def _accept(self, t: Transfer, h: KVChunk, data: np.ndarray) -> int:
        """Check a chunk and land it; the layers it completed (0 while its group is partial)."""
        self._check(t, h, data)
        if checksum(data) != h.crc32c:
            raise KVTransferError(f"checksum mismatch in layer {h.first_layer} at {h.offset}")
        layers = range(h.first_layer, h.first_layer + h.num_layers)
        whole = h.offset == 0 and h.length == h.total_bytes
        with t.lock:
            group = t.groups.get(h.first_layer)
            if group is None:
                if t.claimed.intersection(layers):
                    raise KVTransferError(f"unexpected layer {h.first_layer}: sent twice")
                t.claimed.update(layers)
                if not whole:
                    group = t.groups[h.first_layer] = _Group(
                        h.num_layers, h.total_bytes, np.empty(h.total_bytes, dtype=np.uint8))
            elif (group.num_layers, group.total) != (h.num_layers, h.total_bytes) or \
                    h.offset in group.offsets:
                raise KVTransferError(f"chunk of layer {h.first_layer} at offset {h.offset} "
                                      "does not fit its group, or came twice")
            if group is not None:
                group.offsets.add(h.offset)
            t.bytes_received += len(data)
        payload = data
        if group is not None:  # cut across chunks: gather them in the group's buffer
            group.buffer[h.offset : h.offset + len(data)] = data
            with t.lock:
                group.received += len(data)
                if group.received < group.total:
                    return 0
                del t.groups[h.first_layer]
            payload = group.buffer
        if t.error:  # failed (or given up on) meanwhile: its blocks may belong to another now
            raise KVTransferError(t.error)
        unpack_layers(self.cache, h.first_layer, t.block_tensor, payload)
        with t.lock:
            t.layers_done.update(layers)
            if len(t.layers_done) == self.cache.spec.num_layers:
                t.done.set()
        return h.num_layers

    def _check(self, t: Transfer, h: KVChunk, data: np.ndarray) -> None:
        """A chunk's header, and its payload's length, against what the transfer expects."""
        if t.error:
            raise KVTransferError(t.error)
        if time.monotonic() > t.deadline:
            raise KVTransferError(f"transfer {t.transfer_id} is past its deadline")
        if h.request_id != t.request_id:
            raise KVTransferError("chunk names another transfer or request")
        spec = self.cache.spec
        layers = range(h.first_layer, h.first_layer + h.num_layers)
        if not layers or layers.stop > spec.num_layers:
            raise KVTransferError(f"unexpected layer {h.first_layer} (+{h.num_layers})")
        if list(h.block_ids) != t.block_ids:
            raise KVTransferError(f"block ids {list(h.block_ids)} are not the reserved "
                                  f"{t.block_ids}")
        if h.dtype != DTYPE_NAMES[spec.dtype]:
            raise KVTransferError(f"dtype {h.dtype} does not match the cache's "
                                  f"{DTYPE_NAMES[spec.dtype]}")
        shape = payload_shape(spec, len(t.block_ids))
        if tuple(h.shape) != shape or \
                h.total_bytes != payload_nbytes(spec, len(t.block_ids)) * h.num_layers:
            raise KVTransferError(f"layer shape {tuple(h.shape)} does not match {shape}")
        if len(data) != h.length:
            raise KVTransferError(f"{len(data)} payload bytes after the header of layer "
                                  f"{h.first_layer} at {h.offset}, which announced {h.length} "
                                  "bytes")
        if h.offset + h.length > h.total_bytes:
            raise KVTransferError(f"chunk at offset {h.offset} (+{h.length}) runs past the "
                                  f"group's {h.total_bytes} bytes")

    def _end(self, t: Transfer, h: KVChunk) -> None:
        """The sender stopped after `h.layers_sent` layers: short of all of them, the transfer
        cannot complete."""
        if t.error:
            raise KVTransferError(t.error)
        if not t.done.is_set():
            raise KVTransferError(f"push for {t.transfer_id} ended after {h.layers_sent} of "
                                  f"{self.cache.spec.num_layers} layers")

    def _fail(self, t: Transfer, message: str) -> None:
        if t.error is None:
            t.error = message
            log.warning("KV transfer %s failed: %s", t.transfer_id, message)
        t.done.set()


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: grpc abort raises")


class KVSender:
    """Client side of the KV link (run by a prefill worker): streams layers as they are ready.

    Each group of layers goes out in chunks of up to `chunk_bytes` payload bytes, one unary call
    each, with up to `in_flight` calls of a transfer under way at once. Streamed layers go one by
    one, or together once they hold `min_group_bytes` (a CPU prefill worker's: `MIN_GROUP_BYTES`).
    """

    def __init__(self, address: str, token: str, chunk_bytes: int = CHUNK_BYTES,
                 in_flight: int = IN_FLIGHT, min_group_bytes: int = 0):
        if not 1 <= chunk_bytes <= CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be 1 to {CHUNK_BYTES}, got {chunk_bytes}")
        if not 0 <= min_group_bytes <= chunk_bytes:
            raise ConfigError(f"min_group_bytes must be 0 to chunk_bytes ({chunk_bytes}), got "
                              f"{min_group_bytes}")
        if not 1 <= in_flight <= MAX_IN_FLIGHT:
            raise ConfigError(f"in_flight must be 1 to {MAX_IN_FLIGHT}, got {in_flight}")
        self.address = address
        self.token = token
        self.chunk_bytes = chunk_bytes
        self.in_flight = in_flight
        self.min_group_bytes = min_group_bytes
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        )
        self._push = self._channel.unary_unary(PUSH_METHOD)  # bytes in, bytes out

    def close(self) -> None:
        self._channel.close()

    def push(self, transfer_id: str, request_id: str, dst_block_ids: list[int],
             layers: Iterable[tuple[int, torch.Tensor]], spec: KVCacheSpec,
             timeout_s: float, min_group_bytes: int | None = None) -> PushResult:
        """Send each `(first_layer, payload)` as `layers` yields it, then wait for every answer.

        A payload is one or more consecutive layers' `pack_layer` bytes. `layers` may block
        between items: a prefill worker yields a layer as soon as the model has written it, so
        the transfer overlaps the compute of later layers. Consecutive payloads go out together
        until they hold `min_group_bytes` (`ready_groups`; None: the sender's own).
        """
        layer_bytes = payload_nbytes(spec, len(dst_block_ids))
        template = KVChunk(transfer_id=transfer_id, request_id=request_id,
                           block_ids=dst_block_ids, dtype=DTYPE_NAMES[spec.dtype],
                           shape=payload_shape(spec, len(dst_block_ids)))
        metadata = ((TOKEN_HEADER, self.token), (TRANSFER_HEADER, transfer_id))
        calls: deque[grpc.Future] = deque()
        total = PushResult(transfer_id=transfer_id)
        sent = 0
        try:
            least = self.min_group_bytes if min_group_bytes is None else min_group_bytes
            for group in ready_groups(layers, layer_bytes, least):
                for message in encode(group, template, self.chunk_bytes):
                    while len(calls) >= self.in_flight:
                        self._settle(transfer_id, calls.popleft(), total)
                    calls.append(self._push.future(message, timeout=timeout_s,
                                                   metadata=metadata))
                sent += group.num_layers
            while calls:
                self._settle(transfer_id, calls.popleft(), total)
        except BaseException:
            for call in calls:
                call.cancel()
            self._tell_end(template, sent, metadata)  # the receiver need not wait it out
            raise
        if sent < spec.num_layers:
            end = self._push.future(end_frame(template, sent), timeout=timeout_s,
                                    metadata=metadata)
            self._settle(transfer_id, end, total)  # refused: the transfer fails, and says why
        return total

    def push_blocks(self, cache: PagedKVCache, transfer_id: str, request_id: str,
                    src_block_ids: list[int], dst_block_ids: list[int],
                    timeout_s: float) -> PushResult:
        """Send every layer of blocks that are already computed (packed a group at a time,
        as `group_size` sizes the groups: not joined again)."""
        return self.push(transfer_id, request_id, dst_block_ids,
                         self.packed_groups(cache, src_block_ids), cache.spec, timeout_s,
                         min_group_bytes=0)

    def packed_groups(self, cache: PagedKVCache, block_ids: list[int]
                      ) -> Iterator[tuple[int, torch.Tensor]]:
        """`(first_layer, payload)` of every layer of `block_ids`, packed a group at a time."""
        src = torch.tensor(block_ids)
        layers = cache.spec.num_layers
        size = self.group_size(cache.spec, len(block_ids))
        for first in range(0, layers, size):
            yield first, pack_layers(cache, first, min(size, layers - first), src)

    def group_size(self, spec: KVCacheSpec, num_blocks: int) -> int:
        """Layers per group when all of them are ready at once: as many as fill a chunk, but
        enough groups for the calls a transfer this size keeps in flight."""
        layer_bytes = payload_nbytes(spec, num_blocks)
        chunks = -(-layer_bytes * spec.num_layers // self.chunk_bytes)
        calls = max(1, min(self.in_flight, chunks))  # each call has a fixed cost
        return group_size(spec.num_layers, layer_bytes, calls, self.chunk_bytes)

    def _settle(self, transfer_id: str, call: grpc.Future, total: PushResult) -> None:
        """Wait for one call's answer and add it to `total`; a failed call is raised."""
        try:
            answer = PushResult.FromString(call.result())
        except grpc.RpcError as exc:
            raise KVTransferError(f"KV push {transfer_id} to {self.address} failed: "
                                  f"{exc.code().name}: {exc.details()}") from exc
        total.layers_received += answer.layers_received
        total.bytes_received += answer.bytes_received

    def _tell_end(self, template: KVChunk, sent: int, metadata: tuple) -> None:
        """Best effort, on a failed push: the receiver fails the transfer at once."""
        with contextlib.suppress(grpc.RpcError):  # refused (already failed) or unreachable:
            self._push(end_frame(template, sent), timeout=5.0, metadata=metadata)  # deadline
