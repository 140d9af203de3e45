"""The KV link: prefill workers push KV layer by layer over gRPC into a decode worker's blocks.

The receiver (`KVReceiver`, one per decode worker) accepts a push only for a transfer it was
told to expect (`expect`): same request, the very block ids it reserved, the cache's dtype and
shape, within a deadline, with the shared token in the call's metadata. Each chunk carries a
CRC32 of its bytes. Layers land in the cache as soon as their last chunk arrives, so a sender can
stream early layers while later ones are still being computed. Anything wrong aborts the call
with a status that says what, and the transfer's waiter gets a `KVTransferError`.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
import torch

from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.actors.kv_transfer import (
    DTYPE_NAMES,
    pack_layer,
    payload_nbytes,
    payload_shape,
    unpack_layer,
)
from baton.errors import KVTransferError
from baton.protos import kv_link_pb2, kv_link_pb2_grpc

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-baton-kv-token"
CHUNK_BYTES = 4 << 20
MAX_MESSAGE_BYTES = CHUNK_BYTES + (1 << 20)


@dataclass(slots=True)
class Transfer:
    """What a receiver expects for one transfer, and how it is going."""

    transfer_id: str
    request_id: str
    block_ids: list[int]
    deadline: float
    layers_done: set[int] = field(default_factory=set)
    bytes_received: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class KVReceiver(kv_link_pb2_grpc.KVLinkServicer):
    """gRPC KVLink server writing pushed KV into `cache` (run by a decode worker)."""

    def __init__(self, cache: PagedKVCache, token: str, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 8):
        self.cache = cache
        self.token = token
        self._transfers: dict[str, Transfer] = {}
        self._lock = threading.Lock()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-recv"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        kv_link_pb2_grpc.add_KVLinkServicer_to_server(self, self._server)
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
        if t is not None and not t.done.is_set():
            self._fail(t, f"transfer {transfer_id} was given up on by the receiver")

    # -- gRPC side --------------------------------------------------------------------------------

    def Push(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        if dict(context.invocation_metadata()).get(TOKEN_HEADER) != self.token:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong KV link token")
        transfer: Transfer | None = None
        partial: dict[int, bytearray] = {}
        try:
            for chunk in request_iterator:
                transfer = transfer or self._lookup(chunk.transfer_id)
                self._accept(transfer, chunk, partial)
                if len(transfer.layers_done) == self.cache.spec.num_layers:
                    transfer.done.set()
        except KVTransferError as exc:
            if transfer is not None:
                self._fail(transfer, exc.message)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        if transfer is None:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "empty push")
        if not transfer.done.is_set():
            msg = (f"push for {transfer.transfer_id} ended after {len(transfer.layers_done)} of "
                   f"{self.cache.spec.num_layers} layers")
            self._fail(transfer, msg)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, msg)
        return kv_link_pb2.PushResult(
            transfer_id=transfer.transfer_id, layers_received=len(transfer.layers_done),
            bytes_received=transfer.bytes_received,
        )

    def _lookup(self, transfer_id: str) -> Transfer:
        with self._lock:
            t = self._transfers.get(transfer_id)
        if t is None:
            raise KVTransferError(f"no transfer {transfer_id!r} is expected here")
        return t

    def _accept(self, t: Transfer, chunk, partial: dict[int, bytearray]) -> None:
        spec = self.cache.spec
        if t.error:
            raise KVTransferError(t.error)
        if time.monotonic() > t.deadline:
            raise KVTransferError(f"transfer {t.transfer_id} is past its deadline")
        if chunk.transfer_id != t.transfer_id or chunk.request_id != t.request_id:
            raise KVTransferError("chunk names another transfer or request")
        if chunk.layer >= spec.num_layers or chunk.layer in t.layers_done:
            raise KVTransferError(f"unexpected layer {chunk.layer}")
        if zlib.crc32(chunk.data) != chunk.crc32:
            raise KVTransferError(f"checksum mismatch in layer {chunk.layer} at {chunk.offset}")
        total = payload_nbytes(spec, len(t.block_ids))
        buf = partial.get(chunk.layer)
        if buf is None:
            if list(chunk.block_ids) != t.block_ids:
                raise KVTransferError(f"block ids {list(chunk.block_ids)} are not the reserved "
                                      f"{t.block_ids}")
            if chunk.dtype != DTYPE_NAMES[spec.dtype]:
                raise KVTransferError(f"dtype {chunk.dtype} does not match the cache's "
                                      f"{DTYPE_NAMES[spec.dtype]}")
            if tuple(chunk.shape) != payload_shape(spec, len(t.block_ids)) or \
                    chunk.total_bytes != total:
                raise KVTransferError(f"layer shape {tuple(chunk.shape)} does not match "
                                      f"{payload_shape(spec, len(t.block_ids))}")
            buf = partial[chunk.layer] = bytearray()
        if chunk.offset != len(buf) or len(buf) + len(chunk.data) > total:
            raise KVTransferError(f"chunk at offset {chunk.offset} out of order or past the end")
        buf += chunk.data
        t.bytes_received += len(chunk.data)
        if len(buf) == total:
            payload = torch.frombuffer(partial.pop(chunk.layer), dtype=torch.uint8)
            unpack_layer(self.cache, chunk.layer, torch.tensor(t.block_ids), payload)
            t.layers_done.add(chunk.layer)

    def _fail(self, t: Transfer, message: str) -> None:
        if t.error is None:
            t.error = message
            log.warning("KV transfer %s failed: %s", t.transfer_id, message)
        t.done.set()


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: grpc abort raises")


class KVSender:
    """Client side of the KV link (run by a prefill worker): streams layers as they are ready."""

    def __init__(self, address: str, token: str, chunk_bytes: int = CHUNK_BYTES):
        self.address = address
        self.token = token
        self.chunk_bytes = chunk_bytes
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        )
        self._stub = kv_link_pb2_grpc.KVLinkStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def push(self, transfer_id: str, request_id: str, dst_block_ids: list[int],
             layers: Iterable[tuple[int, torch.Tensor]], spec: KVCacheSpec,
             timeout_s: float) -> kv_link_pb2.PushResult:
        """Send each `(layer, payload)` as `layers` yields it, then wait for the answer.

        `layers` may block between items: a prefill worker yields a layer as soon as the model
        has written it (`pack_layer`), so the transfer overlaps the compute of later layers.
        """
        chunks = self._chunks(transfer_id, request_id, dst_block_ids, layers, spec)
        try:
            return self._stub.Push(chunks, timeout=timeout_s,
                                   metadata=((TOKEN_HEADER, self.token),))
        except grpc.RpcError as exc:
            raise KVTransferError(f"KV push {transfer_id} to {self.address} failed: "
                                  f"{exc.code().name}: {exc.details()}") from exc

    def push_blocks(self, cache: PagedKVCache, transfer_id: str, request_id: str,
                    src_block_ids: list[int], dst_block_ids: list[int],
                    timeout_s: float) -> kv_link_pb2.PushResult:
        """Send every layer of blocks that are already computed."""
        src = torch.tensor(src_block_ids)
        layers = ((i, pack_layer(cache, i, src)) for i in range(cache.spec.num_layers))
        return self.push(transfer_id, request_id, dst_block_ids, layers, cache.spec, timeout_s)

    def _chunks(self, transfer_id, request_id, dst_block_ids, layers,
                spec: KVCacheSpec) -> Iterator[kv_link_pb2.KVChunk]:
        shape = payload_shape(spec, len(dst_block_ids))
        for layer, payload in layers:
            data = payload.numpy().tobytes()
            for offset in range(0, len(data), self.chunk_bytes):
                piece = data[offset : offset + self.chunk_bytes]
                first = offset == 0
                yield kv_link_pb2.KVChunk(
                    transfer_id=transfer_id, request_id=request_id, layer=layer,
                    block_ids=dst_block_ids if first else [], dtype=DTYPE_NAMES[spec.dtype],
                    shape=shape if first else [], offset=offset, total_bytes=len(data),
                    data=piece, crc32=zlib.crc32(piece),
                )
