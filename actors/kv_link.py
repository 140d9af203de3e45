"""The KV link: prefill workers push KV layer by layer over gRPC into a decode worker's blocks.

The receiver (`KVReceiver`, one per decode worker) accepts a push only for a transfer it was
told to expect (`expect`): same request, the very block ids it reserved, the cache's dtype and
shape, within a deadline, with the shared token in every call's metadata. A transfer travels on
several concurrent Push calls (streams, each naming the transfer and their number in its
metadata), each carrying whole groups of layers as raw bytes (see `kv_wire`); each chunk carries
a CRC32C of its bytes. Layers land in the cache as soon as their
group's last chunk arrives, so a sender can stream early layers while later ones are still being
computed. Anything wrong aborts the call with a status that says what, fails the whole transfer
(its other streams are refused from their next chunk on), and the transfer's waiter gets a
`KVTransferError`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
import torch
from google.protobuf.message import DecodeError

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
    MAX_MESSAGE_BYTES,
    MAX_STREAMS,
    PUSH_METHOD,
    SERVICE,
    STREAMS,
    STREAMS_HEADER,
    TOKEN_HEADER,
    TRANSFER_HEADER,
    LayerFeed,
    checksum,
    encode,
    group_size,
)
from baton.errors import ConfigError, KVTransferError
from baton.protos.kv_link_pb2 import KVChunk, PushResult

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Transfer:
    """What a receiver expects for one transfer, and how it is going (shared by its streams)."""

    transfer_id: str
    request_id: str
    block_ids: list[int]
    deadline: float
    block_tensor: torch.Tensor = field(init=False)
    layers_done: set[int] = field(default_factory=set)
    claimed: set[int] = field(default_factory=set)  # layers a stream has begun (or landed)
    streams: int = 0  # as the first call announced it; every call must agree
    streams_ended: int = 0
    bytes_received: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.block_tensor = torch.tensor(self.block_ids)


@dataclass(slots=True)
class _Group:
    """The layer group a stream is receiving: its chunks so far."""

    first_layer: int
    num_layers: int
    total: int
    received: int = 0
    buffer: bytearray | None = None  # only when the group is cut across chunks


@dataclass(slots=True)
class _Stream:
    """One Push call's progress."""

    transfer: Transfer
    group: _Group | None = None
    layers: int = 0
    nbytes: int = 0


class KVReceiver:
    """gRPC KVLink server writing pushed KV into `cache` (run by a decode worker)."""

    def __init__(self, cache: PagedKVCache, token: str, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 16):
        self.cache = cache
        self.token = token
        self._transfers: dict[str, Transfer] = {}
        self._lock = threading.Lock()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-recv"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        # Bytes in, bytes out: the payload messages reach `_push` as gRPC hands them over.
        handler = grpc.stream_unary_rpc_method_handler(self._push)
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

    def _push(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        if metadata.get(TOKEN_HEADER) != self.token:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong KV link token")
        try:
            transfer = self._lookup(str(metadata.get(TRANSFER_HEADER, "")))
        except KVTransferError as exc:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        stream = _Stream(transfer)
        try:
            self._join(transfer, str(metadata.get(STREAMS_HEADER, "")))
            for header, data in _chunks(messages):
                self._accept(transfer, stream, header, data)
            self._end(transfer, stream)
        except KVTransferError as exc:
            self._fail(transfer, exc.message)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except grpc.RpcError:  # the sender cancelled this stream: the transfer cannot complete
            self._fail(transfer, f"a stream of transfer {transfer.transfer_id} was cancelled "
                                 "by its sender")
            raise
        return PushResult(transfer_id=transfer.transfer_id, layers_received=stream.layers,
                          bytes_received=stream.nbytes).SerializeToString()

    def _lookup(self, transfer_id: str) -> Transfer:
        with self._lock:
            t = self._transfers.get(transfer_id)
        if t is None:
            raise KVTransferError(f"no transfer {transfer_id!r} is expected here")
        return t

    def _join(self, t: Transfer, streams: str) -> None:
        """A call of the transfer starts: it must agree on how many calls carry the transfer."""
        if not streams.isdigit() or not 1 <= int(streams) <= MAX_STREAMS:
            raise KVTransferError(f"{streams or 'no'} streams announced, 1 to {MAX_STREAMS} "
                                  "allowed")
        with t.lock:
            if t.streams and int(streams) != t.streams:
                raise KVTransferError(f"{streams} streams announced, earlier {t.streams}")
            t.streams = int(streams)

    def _accept(self, t: Transfer, stream: _Stream, h: KVChunk, data: bytes) -> None:
        if t.error:
            raise KVTransferError(t.error)
        if time.monotonic() > t.deadline:
            raise KVTransferError(f"transfer {t.transfer_id} is past its deadline")
        if h.transfer_id != t.transfer_id or h.request_id != t.request_id:
            raise KVTransferError("chunk names another transfer or request")
        if checksum(data) != h.crc32c:
            raise KVTransferError(f"checksum mismatch in layer {h.first_layer} at {h.offset}")
        group = stream.group or self._begin_group(t, h)
        if (h.first_layer, h.num_layers, h.offset) != \
                (group.first_layer, group.num_layers, group.received) or \
                group.received + len(data) > group.total:
            raise KVTransferError(f"chunk at offset {h.offset} out of order or past the end")
        stream.group = group
        payload: bytes | bytearray = data
        if len(data) != group.total:  # cut across chunks: gather them in one buffer
            group.buffer = group.buffer or bytearray(group.total)
            group.buffer[group.received : group.received + len(data)] = data
            payload = group.buffer
        group.received += len(data)
        stream.nbytes += len(data)
        with t.lock:
            t.bytes_received += len(data)
        if group.received == group.total:
            unpack_layers(self.cache, group.first_layer, t.block_tensor, payload)
            stream.group = None
            stream.layers += group.num_layers
            with t.lock:
                t.layers_done.update(range(group.first_layer, group.first_layer + group.num_layers))
                if len(t.layers_done) == self.cache.spec.num_layers:
                    t.done.set()

    def _begin_group(self, t: Transfer, h: KVChunk) -> _Group:
        """Check a group's first chunk against what the transfer expects, and claim its layers."""
        spec = self.cache.spec
        if h.offset != 0:
            raise KVTransferError(f"chunk at offset {h.offset} out of order or past the end")
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
        with t.lock:
            if t.claimed.intersection(layers):
                raise KVTransferError(f"unexpected layer {h.first_layer}: sent twice")
            t.claimed.update(layers)
        return _Group(h.first_layer, h.num_layers, h.total_bytes)

    def _end(self, t: Transfer, stream: _Stream) -> None:
        """A stream ended cleanly: the last of the transfer's streams must leave it complete."""
        with t.lock:
            t.streams_ended += 1
            last = t.streams_ended >= t.streams
        if t.error:
            raise KVTransferError(t.error)
        if t.done.is_set() or (stream.group is None and not last):
            return
        raise KVTransferError(f"push for {t.transfer_id} ended after {len(t.layers_done)} of "
                              f"{self.cache.spec.num_layers} layers")

    def _fail(self, t: Transfer, message: str) -> None:
        if t.error is None:
            t.error = message
            log.warning("KV transfer %s failed: %s", t.transfer_id, message)
        t.done.set()


def _chunks(messages: Iterator[bytes]) -> Iterator[tuple[KVChunk, bytes]]:
    """Pair each header message with the payload message that follows it."""
    for raw in messages:
        try:
            header = KVChunk.FromString(raw)
        except DecodeError as exc:
            raise KVTransferError("malformed chunk header") from exc
        data = next(messages, None)
        if data is None or len(data) != header.length:
            got = "no" if data is None else f"{len(data)} bytes of"
            raise KVTransferError(f"{got} payload after the header of layer {header.first_layer} "
                                  f"at {header.offset}, which announced {header.length} bytes")
        yield header, data


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: grpc abort raises")


class KVSender:
    """Client side of the KV link (run by a prefill worker): streams layers as they are ready.

    A transfer's layer groups go round-robin onto up to `streams` concurrent Push calls, in
    messages of up to `chunk_bytes` payload bytes.
    """

    def __init__(self, address: str, token: str, chunk_bytes: int = CHUNK_BYTES,
                 streams: int = STREAMS):
        if not 1 <= chunk_bytes <= CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be 1 to {CHUNK_BYTES}, got {chunk_bytes}")
        if not 1 <= streams <= MAX_STREAMS:
            raise ConfigError(f"streams must be 1 to {MAX_STREAMS}, got {streams}")
        self.address = address
        self.token = token
        self.chunk_bytes = chunk_bytes
        self.streams = streams
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        )
        self._push = self._channel.stream_unary(PUSH_METHOD)  # bytes in, bytes out

    def close(self) -> None:
        self._channel.close()

    def push(self, transfer_id: str, request_id: str, dst_block_ids: list[int],
             layers: Iterable[tuple[int, torch.Tensor]], spec: KVCacheSpec,
             timeout_s: float) -> PushResult:
        """Send each `(layer, payload)` as `layers` yields it, then wait for every stream's answer.

        `layers` may block between items: a prefill worker yields a layer as soon as the model
        has written it (`pack_layer`), so the transfer overlaps the compute of later layers.
        """
        num_streams = self._streams_for(spec, len(dst_block_ids))
        feed = LayerFeed(num_streams, self._group_size(spec, len(dst_block_ids)))
        template = KVChunk(transfer_id=transfer_id, request_id=request_id,
                           block_ids=dst_block_ids, dtype=DTYPE_NAMES[spec.dtype],
                           shape=payload_shape(spec, len(dst_block_ids)))
        metadata = ((TOKEN_HEADER, self.token), (TRANSFER_HEADER, transfer_id),
                    (STREAMS_HEADER, str(num_streams)))
        calls = [self._push.future(self._messages(feed, i, template), timeout=timeout_s,
                                   metadata=metadata) for i in range(num_streams)]
        try:
            for layer, payload in layers:
                feed.put(layer, payload)
        except BaseException:
            _cancel(feed, calls)
            raise
        feed.close()
        return self._results(transfer_id, feed, calls)

    def push_blocks(self, cache: PagedKVCache, transfer_id: str, request_id: str,
                    src_block_ids: list[int], dst_block_ids: list[int],
                    timeout_s: float) -> PushResult:
        """Send every layer of blocks that are already computed (packed a group at a time)."""
        src = torch.tensor(src_block_ids)
        spec = cache.spec
        size = self._group_size(spec, len(src_block_ids))

        def layers() -> Iterator[tuple[int, torch.Tensor]]:
            for first in range(0, spec.num_layers, size):
                n = min(size, spec.num_layers - first)
                packed = pack_layers(cache, first, n, src).view(n, -1)
                yield from ((first + i, packed[i]) for i in range(n))

        return self.push(transfer_id, request_id, dst_block_ids, layers(), spec, timeout_s)

    def _streams_for(self, spec: KVCacheSpec, num_blocks: int) -> int:
        """Streams for a transfer: one per full message at most (each call has a fixed cost)."""
        messages = -(-payload_nbytes(spec, num_blocks) * spec.num_layers // self.chunk_bytes)
        return max(1, min(self.streams, spec.num_layers, messages))

    def _group_size(self, spec: KVCacheSpec, num_blocks: int) -> int:
        return group_size(spec.num_layers, payload_nbytes(spec, num_blocks),
                          self._streams_for(spec, num_blocks), self.chunk_bytes)

    def _messages(self, feed: LayerFeed, stream: int, template: KVChunk) -> Iterator[bytes]:
        while (group := feed.take(stream)) is not None:
            yield from encode(group, template, self.chunk_bytes)

    def _results(self, transfer_id: str, feed: LayerFeed, calls: list[grpc.Future]) -> PushResult:
        """Every stream's answer summed; the first failure cancels the others and is raised."""
        total = PushResult(transfer_id=transfer_id)
        for call in calls:
            try:
                answer = PushResult.FromString(call.result())
            except grpc.RpcError as exc:
                _cancel(feed, calls)
                raise KVTransferError(f"KV push {transfer_id} to {self.address} failed: "
                                      f"{exc.code().name}: {exc.details()}") from exc
            total.layers_received += answer.layers_received
            total.bytes_received += answer.bytes_received
        return total


def _cancel(feed: LayerFeed, calls: list[grpc.Future]) -> None:
    """Abandon a push: no more layers go out, and every stream is cancelled."""
    feed.close(drop=True)
    for call in calls:
        call.cancel()
