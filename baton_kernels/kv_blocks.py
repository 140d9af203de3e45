"""Gather a request's KV blocks into one contiguous buffer, and scatter such a buffer back.

The KV link's packing: for layers `0..L-1` of a paged cache (each `[kv_heads, num_blocks,
block_size, head_dim]`, keys and values apart), the blocks named by `block_ids` become one
`[L, 2, kv_heads, n, block_size, head_dim]` buffer (keys, then values, per layer), and go back into
whichever blocks the receiver reserved. Copies are bit for bit on every path.

The cache's layers are views of one stacked tensor (`PagedKVCache.blocks`), and the link copies
through `gather_stacked` / `scatter_stacked`. On the CPU those run in numpy, on one thread, all
layers in one call: the copies are memory-bound, and torch's parallel index ops stall whenever
their second thread is descheduled (on a busy 2-core machine, scattering a 2 MiB layer took 16 ms
with torch's 2 threads, 1.3 ms with one, 0.2 ms in numpy), while `torch.set_num_threads` cannot
be lowered for one thread alone; 30 layers of 3 blocks took 0.03 ms in one call, 0.32 ms layer by
layer. `gather_blocks` / `scatter_blocks` take the layers as lists, for the Triton kernel (and
the reference elsewhere).
"""

from __future__ import annotations

import numpy as np
import torch

from baton.errors import KVTransferError
from baton.kernels.dispatch import backend


def payload_shape(keys: list[torch.Tensor], num_blocks: int) -> tuple[int, ...]:
    hkv, _, bs, d = keys[0].shape
    return (len(keys), 2, hkv, num_blocks, bs, d)


def gather_blocks(keys: list[torch.Tensor], values: list[torch.Tensor],
                  block_ids: torch.Tensor) -> torch.Tensor:
    """`block_ids` of every layer's keys and values as one contiguous buffer on their device."""
    ids = _checked_ids(keys, values, block_ids)
    if backend(keys[0].device) == "triton":
        from baton.kernels.kv_blocks_triton import copy_blocks

        out = keys[0].new_empty(payload_shape(keys, len(ids)))
        copy_blocks(keys, values, ids, out, to_payload=True)
        return out
    return gather_blocks_reference(keys, values, ids)


def scatter_blocks(keys: list[torch.Tensor], values: list[torch.Tensor],
                   block_ids: torch.Tensor, payload: torch.Tensor) -> None:
    """Write a `gather_blocks` buffer into `block_ids` of every layer's keys and values."""
    ids = _checked_ids(keys, values, block_ids)
    _check_payload(payload, payload_shape(keys, len(ids)), keys[0].dtype)
    payload = payload.to(keys[0].device).contiguous()
    if backend(keys[0].device) == "triton":
        from baton.kernels.kv_blocks_triton import copy_blocks

        copy_blocks(keys, values, ids, payload, to_payload=False)
        return
    scatter_blocks_reference(keys, values, ids, payload)


def gather_stacked(blocks: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """`gather_blocks` over layers stacked in one tensor `[L, 2, kv_heads, num_blocks,
    block_size, head_dim]` (keys, then values, per layer)."""
    if blocks.device.type != "cpu":
        return gather_blocks(list(blocks[:, 0]), list(blocks[:, 1]), block_ids)
    ids = _checked_stacked_ids(blocks, block_ids)
    layers, _, hkv, _, bs, d = blocks.shape
    out = torch.empty((layers, 2, hkv, len(ids), bs, d), dtype=blocks.dtype)
    np.take(_rows(blocks), ids.numpy(), axis=3, out=_rows(out), mode="clip")  # ids checked
    return out


def scatter_stacked(blocks: torch.Tensor, block_ids: torch.Tensor,
                    payload: torch.Tensor) -> None:
    """`scatter_blocks` into layers stacked in one tensor (see `gather_stacked`)."""
    if blocks.device.type != "cpu":
        scatter_blocks(list(blocks[:, 0]), list(blocks[:, 1]), block_ids, payload)
        return
    ids = _checked_stacked_ids(blocks, block_ids)
    layers, _, hkv, _, bs, d = blocks.shape
    _check_payload(payload, (layers, 2, hkv, len(ids), bs, d), blocks.dtype)
    _rows(blocks)[:, :, :, ids.numpy()] = _rows(payload.contiguous())


def _rows(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor `[..., block_size, head_dim]` as numpy uint8 `[..., block bytes]`."""
    return t.view(torch.uint8).numpy().reshape(*t.shape[:-2], -1)


def _checked_stacked_ids(blocks: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    if blocks.dim() != 6 or blocks.shape[1] != 2 or not blocks.is_contiguous():
        raise KVTransferError("stacked KV layers must be one contiguous [layers, 2, kv_heads, "
                              f"num_blocks, block_size, head_dim] tensor, got "
                              f"{tuple(blocks.shape)}")
    _check_block_ids(block_ids, blocks.shape[3])
    return block_ids.to(dtype=torch.long)


def gather_blocks_reference(keys: list[torch.Tensor], values: list[torch.Tensor],
                            block_ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack((k.index_select(1, block_ids), v.index_select(1, block_ids)))
                        for k, v in zip(keys, values, strict=True)])


def scatter_blocks_reference(keys: list[torch.Tensor], values: list[torch.Tensor],
                             block_ids: torch.Tensor, payload: torch.Tensor) -> None:
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        k.index_copy_(1, block_ids, payload[layer, 0])
        v.index_copy_(1, block_ids, payload[layer, 1])


def _checked_ids(keys: list[torch.Tensor], values: list[torch.Tensor],
                 block_ids: torch.Tensor) -> torch.Tensor:
    """Block ids on the cache's device, after checking the layers agree and the ids fit."""
    if not keys or len(keys) != len(values):
        raise KVTransferError(f"need the same number (>= 1) of key and value layers, got "
                              f"{len(keys)} and {len(values)}")
    first = keys[0]
    for t in (*keys, *values):
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise KVTransferError("every KV layer must share one shape, dtype and device")
        if not t.is_contiguous():
            raise KVTransferError("KV cache layers must be contiguous")
    _check_block_ids(block_ids, first.shape[1])
    return block_ids.to(device=first.device, dtype=torch.long)


def _check_block_ids(block_ids: torch.Tensor, num_blocks: int) -> None:
    """1-D, and (where they are on the CPU, so checking costs no device sync) within the cache."""
    if block_ids.dim() != 1:
        raise KVTransferError(f"block_ids must be 1-D, got shape {tuple(block_ids.shape)}")
    if block_ids.device.type == "cpu" and len(block_ids) and (
            int(block_ids.min()) < 0 or int(block_ids.max()) >= num_blocks):
        raise KVTransferError(f"block ids {block_ids.tolist()} outside this cache's "
                              f"{num_blocks} blocks")


def _check_payload(payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(payload.shape) != shape or payload.dtype != dtype:
        raise KVTransferError(f"KV payload is {tuple(payload.shape)} {payload.dtype}, this cache "
                              f"expects {shape} {dtype}")
