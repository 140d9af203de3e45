"""Packing a request's KV blocks into a transfer buffer and unpacking into other blocks."""

from __future__ import annotations

import pytest
import torch

from baton.actors.kv_cache import KVCacheSpec, PagedKVCache
from baton.actors.kv_transfer import pack_layer, payload_nbytes, unpack_layer


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
