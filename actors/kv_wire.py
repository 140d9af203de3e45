"""The KV link's wire format (see protos/kv_link.proto): layer groups, chunk headers, CRC32C.

A transfer's layers go in groups of consecutive layers, each group whole on one of several
concurrent Push calls (streams). A group crosses as one or more chunks: a `KVChunk` header
message, then a message of the chunk's raw payload bytes. Small layers share a chunk, so a message
carries up to `CHUNK_BYTES`; a layer larger than that is cut across chunks.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import google_crc32c
import torch

from baton.protos import kv_link_pb2

SERVICE = "baton.kv.v2.KVLink"
PUSH_METHOD = f"/{SERVICE}/Push"
TOKEN_HEADER = "x-baton-kv-token"
TRANSFER_HEADER = "x-baton-kv-transfer"
STREAMS_HEADER = "x-baton-kv-streams"
CHUNK_BYTES = 4 << 20  # most payload bytes in one message
MAX_MESSAGE_BYTES = CHUNK_BYTES + (1 << 20)
STREAMS = 2  # concurrent Push calls per transfer, by default
MAX_STREAMS = 16


def checksum(data: bytes) -> int:
    """CRC32C of a payload message (hardware-accelerated; releases the GIL for large ones)."""
    return google_crc32c.value(data)


@dataclass(slots=True)
class LayerGroup:
    """Consecutive layers' `pack_layer` payloads (uint8 CPU tensors), sent on one stream."""

    first_layer: int
    payloads: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.payloads)

    def cut(self, offset: int, length: int) -> bytes:
        """Bytes `offset .. offset + length` of the group's payload, copied once into a message."""
        pieces = []
        for p in self.payloads:
            n = p.numel()
            if offset < n and length > 0:
                take = min(n - offset, length)
                pieces.append(p[offset : offset + take].numpy())
                length -= take
            offset = max(0, offset - n)
        return b"".join(pieces)


def group_size(num_layers: int, layer_bytes: int, streams: int, chunk_bytes: int) -> int:
    """Most layers in a group: as many as fill a message, but no fewer groups than streams."""
    fill = max(1, chunk_bytes // max(1, layer_bytes))
    spread = -(-num_layers // streams)
    return min(fill, spread)


class LayerFeed:
    """Layers as a producer hands them over, taken in groups by a transfer's streams in turn.

    A stream takes, when its turn comes and it is free, the consecutive layers ready by then (up
    to `size`): layers computed one by one cross one by one, layers ready at once go in groups.
    """

    def __init__(self, streams: int, size: int):
        self.streams = streams
        self.size = size
        self._ready: deque[tuple[int, torch.Tensor]] = deque()
        self._turn = 0
        self._closed = False
        self._cond = threading.Condition()

    def put(self, layer: int, payload: torch.Tensor) -> None:
        with self._cond:
            self._ready.append((layer, payload))
            self._cond.notify_all()

    def close(self, drop: bool = False) -> None:
        """No more layers; with `drop`, those not yet taken are never sent (the push failed)."""
        with self._cond:
            self._closed = True
            if drop:
                self._ready.clear()
            self._cond.notify_all()

    def take(self, stream: int) -> LayerGroup | None:
        """`stream`'s next group, once it is its turn and a layer is ready; None when done."""
        with self._cond:
            self._cond.wait_for(lambda: (self._ready and self._turn == stream)
                                or (self._closed and not self._ready))
            if not self._ready:
                return None
            layer, payload = self._ready.popleft()
            group = LayerGroup(layer, [payload])
            while (self._ready and len(group.payloads) < self.size
                   and self._ready[0][0] == layer + len(group.payloads)):
                group.payloads.append(self._ready.popleft()[1])
            self._turn = (self._turn + 1) % self.streams
            self._cond.notify_all()
            return group


def encode(group: LayerGroup, template: kv_link_pb2.KVChunk,
           chunk_bytes: int) -> Iterator[bytes]:
    """A group's messages: header, payload, header, payload, ... (`template` names the
    transfer, its block ids, dtype and layer shape)."""
    total = group.nbytes
    for offset in range(0, total, chunk_bytes):
        data = group.cut(offset, chunk_bytes)
        header = kv_link_pb2.KVChunk(
            transfer_id=template.transfer_id, request_id=template.request_id,
            first_layer=group.first_layer, num_layers=len(group.payloads), offset=offset,
            total_bytes=total, length=len(data), crc32c=checksum(data),
        )
        if offset == 0:
            header.block_ids.extend(template.block_ids)
            header.dtype = template.dtype
            header.shape.extend(template.shape)
        yield header.SerializeToString()
        yield data
