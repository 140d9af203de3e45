"""Triton kernel behind `kv_blocks`: one launch copies every layer's keys and values.

Each program moves one block of one head of one layer's keys or values. Layers are separate
allocations, so the kernel reads their addresses from a pointer table; elements move as integers
of the same width, which keeps the copy bit-exact whatever the float format.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_blocks_kernel(table_ptr, ids_ptr, payload_ptr, num_heads, num_ids, cache_blocks,
                        BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr,
                        TO_PAYLOAD: tl.constexpr):
    tensor = tl.program_id(0)  # layer * 2 + (0 keys, 1 values)
    head = tl.program_id(1)
    j = tl.program_id(2)
    block = tl.load(ids_ptr + j)
    cache = tl.load(table_ptr + tensor).to(tl.pointer_type(payload_ptr.dtype.element_ty))
    cache_off = (head * cache_blocks + block) * BLOCK_NUMEL
    payload_off = ((tensor * num_heads + head) * num_ids + j) * BLOCK_NUMEL
    for start in range(0, BLOCK_NUMEL, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < BLOCK_NUMEL
        if TO_PAYLOAD:
            data = tl.load(cache + cache_off + offs, mask=mask)
            tl.store(payload_ptr + payload_off + offs, data, mask=mask)
        else:
            data = tl.load(payload_ptr + payload_off + offs, mask=mask)
            tl.store(cache + cache_off + offs, data, mask=mask)


@functools.lru_cache(maxsize=16)
def _pointer_table(pointers: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # A cache's layers never move, so their table is built once, not copied to the GPU per call.
    return torch.tensor(pointers, dtype=torch.int64).to(device)


def copy_blocks(keys: list[torch.Tensor], values: list[torch.Tensor], block_ids: torch.Tensor,
                payload: torch.Tensor, to_payload: bool) -> None:
    """Copy `block_ids` between the layers and `payload` (shapes checked by the caller)."""
    if len(block_ids) == 0:
        return
    hkv, num_blocks, bs, d = keys[0].shape
    pointers = tuple(t.data_ptr() for pair in zip(keys, values, strict=True) for t in pair)
    table = _pointer_table(pointers, keys[0].device)
    as_int = payload.view(_INT_OF_WIDTH[payload.element_size()])
    numel = bs * d
    chunk = min(triton.next_power_of_2(numel), 4096)
    grid = (len(pointers), hkv, len(block_ids))
    _copy_blocks_kernel[grid](table, block_ids, as_int, hkv, len(block_ids), num_blocks,
                              BLOCK_NUMEL=numel, CHUNK=chunk, TO_PAYLOAD=to_payload)
