"""Faults injected into the KV link's wire, for tests over real gRPC."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from baton.actors.kv_wire import LayerGroup, encode
from baton.protos.kv_link_pb2 import KVChunk


def corrupting_encode(layer: int) -> Callable[[LayerGroup, KVChunk, int], Iterator[bytes]]:
    """An `encode` that flips the last bit of the first frame of the group holding `layer` (in
    its payload, after its checksum was taken), as a bad NIC or memory would; patch it over
    `baton.actors.kv_link.encode`.
    """

    def corrupted(group: LayerGroup, template: KVChunk, chunk_bytes: int) -> Iterator[bytes]:
        hit = group.first_layer <= layer < group.first_layer + group.num_layers
        for i, message in enumerate(encode(group, template, chunk_bytes)):
            if hit and i == 0:
                message = message[:-1] + bytes([message[-1] ^ 1])
            yield message

    return corrupted
