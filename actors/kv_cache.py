"""The paged KV cache tensors: per layer, `[num_kv_heads, num_blocks, block_size, head_dim]`.

Heads come first so that gathering a batch's blocks (`index_select` on dim 1) lands directly in
the `[heads, batch, tokens, head_dim]` layout attention multiplies with: one copy, no permute.
All layers' keys and values are views of one tensor, `blocks [layers, 2, heads, num_blocks,
block_size, head_dim]`, so a request's blocks over a run of layers gather into the KV link's
payload layout in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.errors import ConfigError


@dataclass(slots=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def num_blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block

    @classmethod
    def from_model_config(cls, config, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(text.num_hidden_layers, kv_heads, head_dim, block_size, dtype)


class PagedKVCache:
    """Holds the key and value blocks of every layer on one device."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device,
                 scratch_block: bool = False):
        """`num_blocks` for requests; with `scratch_block`, one more after them that no request
        ever holds (`scratch_block` is its id): captured decode steps write their padding rows'
        keys and values there (`actors/cuda_graphs.py`)."""
        if num_blocks < 1:
            raise ConfigError(
                f"KV cache has room for {num_blocks} blocks of {spec.bytes_per_block} bytes; "
                "give it more memory (kv_cache_memory) or a smaller block_size"
            )
        self.spec = spec
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks if scratch_block else None
        shape = (spec.num_kv_heads, num_blocks + int(scratch_block), spec.block_size,
                 spec.head_dim)
        self.blocks = torch.zeros((spec.num_layers, 2, *shape), dtype=spec.dtype, device=device)
        self.keys = [self.blocks[layer, 0] for layer in range(spec.num_layers)]
        self.values = [self.blocks[layer, 1] for layer in range(spec.num_layers)]

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[idx], self.values[idx]
