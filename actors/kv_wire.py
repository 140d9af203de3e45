"""The KV link's wire format (see protos/kv_link.proto): frames, chunk headers, CRC32C.

A transfer's layers go in groups of consecutive layers. A group crosses as one or more chunks,
each its own unary Push call carrying one frame: a 4-byte little-endian header length, the
`KVChunk` header, then the chunk's raw payload bytes. Small layers share a chunk, so a frame
carries up to `CHUNK_BYTES` of payload; a group larger than that is cut across chunks.

One call per chunk, a few in flight at once, rather than long client-streaming calls: on
loopback here a unary call with 1 MiB took 0.5 ms against 1.3 ms for a streaming call of a header
and its payload (each streaming call also starts a thread to feed it).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import google_crc32c
import numpy as np
import torch
from google.protobuf.message import DecodeError

from baton.errors import KVTransferError
from baton.protos import kv_link_pb2

SERVICE = "baton.kv.v3.KVLink"
PUSH_METHOD = f"/{SERVICE}/Push"
TOKEN_HEADER = "x-baton-kv-token"
TRANSFER_HEADER = "x-baton-kv-transfer"
# Most payload bytes in one frame. On loopback here a 64 MiB transfer ran at 941-1092 MiB/s in
# 16 MiB chunks, 648-721 in 4 MiB ones (same process, alternating runs).
CHUNK_BYTES = 16 << 20
MAX_MESSAGE_BYTES = CHUNK_BYTES + (1 << 20)
IN_FLIGHT = 2  # calls of one transfer under way at once, by default
# A CPU prefill worker sends the layers it streams together until they hold this many bytes (or
# the prefill ends): each call costs the sender's core about as much as 0.5-1 MiB of bytes, and
# its sender shares the cores of the forward pass. Where the forward runs on an accelerator the
# host's cores are free for the link, and each layer goes as soon as it is written.
MIN_GROUP_BYTES = 2 << 20
MAX_IN_FLIGHT = 16
_LENGTH = struct.Struct("<I")


def checksum(data: bytes | np.ndarray) -> int:
    """CRC32C of a payload (hardware-accelerated; releases the GIL for large ones)."""
    return google_crc32c.value(data)


@dataclass(slots=True)
class LayerGroup:
    """Consecutive layers' `pack_layer` payloads, back to back: one uint8 CPU tensor, or several
    (`pieces`, in layer order) that the wire joins in the frame's own copy."""

    first_layer: int
    num_layers: int
    pieces: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.pieces)


def group_size(num_layers: int, layer_bytes: int, in_flight: int, chunk_bytes: int) -> int:
    """Most layers in a group: as many as fill a frame, but no fewer groups than calls in
    flight (so that they all have something to carry)."""
    fill = max(1, chunk_bytes // max(1, layer_bytes))
    spread = -(-num_layers // in_flight)
    return min(fill, spread)


def ready_groups(layers: Iterable[tuple[int, torch.Tensor]], layer_bytes: int,
                 min_bytes: int) -> Iterator[LayerGroup]:
    """`layers`' payloads as groups of consecutive layers, each yielded once it holds
    `min_bytes` (the last when `layers` ends, or before a payload that does not follow on)."""
    held: list[torch.Tensor] = []
    first = nxt = size = 0
    for start, payload in layers:
        if held and start != nxt:
            yield LayerGroup(first, nxt - first, tuple(held))
            held = []
        if not held:
            first = nxt = start
            size = 0
        held.append(payload)
        nxt += max(1, payload.numel() // layer_bytes)
        size += payload.numel()
        if size >= min_bytes:
            yield LayerGroup(first, nxt - first, tuple(held))
            held = []
    if held:
        yield LayerGroup(first, nxt - first, tuple(held))


def frame(header: kv_link_pb2.KVChunk, *payload: np.ndarray | bytes) -> bytes:
    """One call's request: the header's length, the header, the payload's parts (one copy of
    them)."""
    head = header.SerializeToString()
    return b"".join((_LENGTH.pack(len(head)), head, *payload))


def encode(group: LayerGroup, template: kv_link_pb2.KVChunk, chunk_bytes: int) -> Iterator[bytes]:
    """A group's frames, one per chunk (`template` names the transfer, its block ids, dtype and
    layer shape)."""
    parts = [p.numpy() for p in group.pieces]
    total = sum(part.size for part in parts)
    if len(parts) > 1 and total <= chunk_bytes:  # one frame, its parts joined by `frame`
        crc = 0
        for part in parts:
            crc = google_crc32c.extend(crc, part)
        yield frame(_header(template, group, 0, total, total, crc), *parts)
        return
    data = parts[0] if len(parts) == 1 else np.concatenate(parts)
    for offset in range(0, total, chunk_bytes):
        piece = data[offset : offset + chunk_bytes]
        yield frame(_header(template, group, offset, piece.size, total, checksum(piece)), piece)


def _header(template: kv_link_pb2.KVChunk, group: LayerGroup, offset: int, length: int,
            total: int, crc: int) -> kv_link_pb2.KVChunk:
    header = kv_link_pb2.KVChunk()
    header.CopyFrom(template)
    header.first_layer = group.first_layer
    header.num_layers = group.num_layers
    header.offset = offset
    header.total_bytes = total
    header.length = length
    header.crc32c = crc
    return header


def end_frame(template: kv_link_pb2.KVChunk, layers_sent: int) -> bytes:
    """The frame that tells the receiver a push stopped after `layers_sent` layers."""
    header = kv_link_pb2.KVChunk(transfer_id=template.transfer_id,
                                 request_id=template.request_id, end=True,
                                 layers_sent=layers_sent)
    return frame(header)


def decode(message: bytes) -> tuple[kv_link_pb2.KVChunk, np.ndarray]:
    """A frame's header and its payload (a read-only uint8 view of `message`, not a copy; its
    length is the caller's to check against the header's)."""
    view = memoryview(message)
    if len(view) < _LENGTH.size:
        raise KVTransferError("malformed chunk: shorter than its length prefix")
    (head_len,) = _LENGTH.unpack_from(view)
    start = _LENGTH.size + head_len
    if start > len(view):
        raise KVTransferError(f"malformed chunk: a {head_len}-byte header announced, "
                              f"{len(view) - _LENGTH.size} bytes sent")
    try:
        header = kv_link_pb2.KVChunk.FromString(view[_LENGTH.size : start])
    except DecodeError as exc:
        raise KVTransferError("malformed chunk header") from exc
    return header, np.frombuffer(message, dtype=np.uint8, offset=start)
