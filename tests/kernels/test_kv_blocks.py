"""KV block gather/scatter: the Triton kernel moves exactly the bits the reference moves."""

from __future__ import annotations

import pytest
import torch

from baton.errors import KVTransferError
from baton.kernels.kv_blocks import (
    gather_blocks,
    gather_blocks_reference,
    gather_stacked,
    scatter_blocks,
    scatter_stacked,
)
from tests.kernels.conftest import DEVICE


def _layers(n_layers, heads, blocks, bs, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(heads, blocks, bs, d, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    return [make() for _ in range(n_layers)], [make() for _ in range(n_layers)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n_layers", "heads", "bs", "d", "ids"), [
    (1, 1, 16, 64, [3]),  # one layer, one block
    (3, 2, 4, 8, [7, 2, 5]),  # all layers, blocks out of order
    (2, 3, 5, 12, [0, 9]),  # block size and head dim not powers of two, first and last block
])
def test_gather_scatter_round_trip_is_bit_exact(triton_path, dtype, n_layers, heads, bs, d, ids):
    keys, values = _layers(n_layers, heads, 10, bs, d, dtype)
    block_ids = torch.tensor(ids)
    payload = gather_blocks(keys, values, block_ids)
    assert payload.is_contiguous() and payload.shape == (n_layers, 2, heads, len(ids), bs, d)
    expected = gather_blocks_reference(keys, values, block_ids.to(DEVICE))
    assert torch.equal(payload.view(torch.uint8), expected.view(torch.uint8))

    dst_keys, dst_values = _layers(n_layers, heads, 12, bs, d, dtype, seed=1)
    before = [t.clone() for t in dst_keys]
    dst_ids = torch.tensor([11 - i for i in range(len(ids))])
    scatter_blocks(dst_keys, dst_values, dst_ids, payload)
    for layer in range(n_layers):
        for s, t in zip(ids, dst_ids.tolist(), strict=True):
            assert torch.equal(dst_keys[layer][:, t], keys[layer][:, s])
            assert torch.equal(dst_values[layer][:, t], values[layer][:, s])
        others = [i for i in range(12) if i not in dst_ids.tolist()]
        assert torch.equal(dst_keys[layer][:, others], before[layer][:, others])


def test_nan_payloads_survive_the_copy(triton_path):
    keys, values = _layers(1, 1, 4, 4, 8, torch.bfloat16)
    keys[0].view(torch.int16)[0, 1, 0, 0] = 0x7FC1  # a NaN with a payload a float copy may drop
    payload = gather_blocks(keys, values, torch.tensor([1]))
    assert payload.view(torch.int16)[0, 0, 0, 0, 0, 0] == 0x7FC1


def test_bad_block_ids_and_payloads_are_refused():
    keys, values = _layers(2, 1, 4, 4, 8, torch.float32)
    with pytest.raises(KVTransferError, match="outside"):
        gather_blocks(keys, values, torch.tensor([4]))
    with pytest.raises(KVTransferError, match="expects"):
        scatter_blocks(keys, values, torch.tensor([0]), torch.zeros(2, 2, 1, 2, 4, 8))
    with pytest.raises(KVTransferError, match="same number"):
        gather_blocks(keys, values[:1], torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stacked_layers_gather_and_scatter_as_the_reference_does(dtype):
    # Layers as the paged cache holds them: views of one [L, 2, heads, blocks, bs, d] tensor.
    g = torch.Generator().manual_seed(2)
    src = torch.randn(3, 2, 2, 10, 5, 12, generator=g).to(dtype)
    ids = torch.tensor([7, 0, 9, 3])
    payload = gather_stacked(src[1:3], ids)
    expected = gather_blocks_reference(list(src[1:3, 0]), list(src[1:3, 1]), ids)
    assert torch.equal(payload.view(torch.uint8), expected.view(torch.uint8))

    dst = torch.zeros(3, 2, 2, 12, 5, 12, dtype=dtype)
    dst_ids = torch.tensor([11, 2, 5, 6])
    scatter_stacked(dst[1:3], dst_ids, payload)
    assert torch.equal(dst[1:3][:, :, :, dst_ids], src[1:3][:, :, :, ids])
    others = [i for i in range(12) if i not in dst_ids.tolist()]
    assert not dst[:, :, :, others].any() and not dst[0].any()  # nothing else was written
    with pytest.raises(KVTransferError, match="outside"):
        gather_stacked(src, torch.tensor([10]))
    with pytest.raises(KVTransferError, match="expects"):
        scatter_stacked(dst[1:3], dst_ids[:2], payload)
