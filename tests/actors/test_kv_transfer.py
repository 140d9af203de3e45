"""Packing a request's KV blocks into a transfer buffer and unpacking into other blocks."""

from __future__ import annotations

import pytest
import torch

from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.actors.kv_transfer import (
    pack_all_layers,
    pack_layer,
    payload_nbytes,
    unpack_all_layers,
    unpack_layer,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocks_arrive_in_the_receivers_own_block_ids(dtype):
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=dtype)
    src = PagedKVCache(spec, num_blocks=10, device=torch.device("cpu"))
    dst = PagedKVCache(spec, num_blocks=12, device=torch.device("cpu"))
    for t in (*src.keys, *src.values):
        t.copy_(torch.randn_like(t, dtype=torch.float32).to(dtype))
    src_ids = torch.tensor([7, 2, 5])
    dst_ids = torch.tensor([0, 11, 3])
    for layer in range(spec.num_layers):
        payload = pack_layer(src, layer, src_ids)
        assert payload.dtype == torch.uint8 and payload.is_contiguous()
        assert payload.numel() == payload_nbytes(spec, 3)
        # The wire carries raw bytes: rebuild from them, as the receiver does.
        received = torch.frombuffer(bytearray(payload.numpy().tobytes()), dtype=torch.uint8)
        unpack_layer(dst, layer, dst_ids, received)
        for s, d in zip(src_ids.tolist(), dst_ids.tolist(), strict=True):
            assert torch.equal(dst.keys[layer][:, d], src.keys[layer][:, s])
            assert torch.equal(dst.values[layer][:, d], src.values[layer][:, s])
    untouched = [i for i in range(12) if i not in dst_ids.tolist()]
    assert not dst.keys[0][:, untouched].any()


def test_all_layers_pack_as_one_buffer_and_land_in_the_receivers_blocks():
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4,
                       dtype=torch.bfloat16)
    src = PagedKVCache(spec, num_blocks=6, device=torch.device("cpu"))
    dst = PagedKVCache(spec, num_blocks=6, device=torch.device("cpu"))
    for t in (*src.keys, *src.values):
        t.copy_(torch.randn_like(t, dtype=torch.float32).to(spec.dtype))
    src_ids, dst_ids = torch.tensor([4, 1]), torch.tensor([2, 5])
    payload = pack_all_layers(src, src_ids)
    assert payload.numel() == payload_nbytes(spec, 2) * spec.num_layers
    # Layer by layer, the one buffer holds exactly what `pack_layer` sends.
    per_layer = payload.view(spec.num_layers, -1)
    for layer in range(spec.num_layers):
        assert torch.equal(per_layer[layer], pack_layer(src, layer, src_ids))
    unpack_all_layers(dst, dst_ids, payload)
    for layer in range(spec.num_layers):
        assert torch.equal(dst.keys[layer][:, [2, 5]], src.keys[layer][:, [4, 1]])
        assert torch.equal(dst.values[layer][:, [2, 5]], src.values[layer][:, [4, 1]])
