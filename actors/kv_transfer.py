"""Gather and scatter between paged KV blocks and contiguous transfer buffers.

The one place the KV link touches cache memory: a layer's blocks for one request are packed into
a single contiguous `[2, kv_heads, num_blocks, block_size, head_dim]` payload (keys, then values)
that goes on the wire as raw bytes, and unpacked into whichever blocks the receiver reserved.
The copies go through `baton.kernels.kv_blocks`: a Triton kernel on CUDA, numpy over all the
layers at once on the CPU, bit for bit alike.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.kernels.kv_blocks import gather_stacked, scatter_stacked

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
WireBytes = bytes | bytearray | np.ndarray  # np.ndarray: a uint8 view of received bytes

# The receiver reads KV straight out of the bytes gRPC handed it (no copy): torch warns once that
# such a tensor is not writable. It is only ever read (scattered into the cache).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def payload_shape(spec: KVCacheSpec, num_blocks: int) -> tuple[int, ...]:
    return (2, spec.num_kv_heads, num_blocks, spec.block_size, spec.head_dim)


def payload_nbytes(spec: KVCacheSpec, num_blocks: int) -> int:
    return spec.bytes_per_block // spec.num_layers * num_blocks


def pack_layer(cache: PagedKVCache, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
    """One layer's keys and values in `block_ids`, as a contiguous byte tensor (on the CPU)."""
    return pack_layers(cache, layer, 1, block_ids)


def pack_layers(cache: PagedKVCache, first_layer: int, num_layers: int,
                block_ids: torch.Tensor) -> torch.Tensor:
    """`num_layers` consecutive `pack_layer` payloads, back to back, in one gather (one byte
    tensor on the CPU): per layer, small gathers cost more in dispatch than in copying."""
    payload = gather_stacked(cache.blocks[first_layer : first_layer + num_layers], block_ids)
    return payload.cpu().view(torch.uint8).reshape(-1)


def unpack_layer(
    cache: PagedKVCache, layer: int, block_ids: torch.Tensor, payload: torch.Tensor
) -> None:
    """Write a `pack_layer` payload into `block_ids` of this cache (sizes checked by the caller)."""
    unpack_layers(cache, layer, block_ids, payload)


def unpack_layers(cache: PagedKVCache, first_layer: int, block_ids: torch.Tensor,
                  payload: torch.Tensor | WireBytes) -> None:
    """Write consecutive `pack_layer` payloads from `first_layer` on into `block_ids` of this
    cache (sizes checked by the caller); wire bytes are read in place (no copy on the CPU)."""
    spec = cache.spec
    if not isinstance(payload, torch.Tensor):
        payload = torch.frombuffer(payload, dtype=torch.uint8)
    data = payload.view(spec.dtype).view(-1, *payload_shape(spec, len(block_ids)))
    scatter_stacked(cache.blocks[first_layer : first_layer + data.shape[0]], block_ids, data)


def pack_all_layers(cache: PagedKVCache, block_ids: torch.Tensor) -> torch.Tensor:
    """Every layer's `pack_layer` payload, in layer order, as one byte tensor (on the CPU)."""
    return pack_layers(cache, 0, cache.spec.num_layers, block_ids)


def unpack_all_layers(cache: PagedKVCache, block_ids: torch.Tensor,
                      payload: torch.Tensor) -> None:
    """Write a `pack_all_layers` payload into `block_ids` of this cache."""
    unpack_layers(cache, 0, block_ids, payload)
