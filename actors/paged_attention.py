"""Paged attention plugged into transformers' attention interface.

Every request's new tokens run packed into one sequence (`[1, T]`); the attention function writes
their keys and values into the paged cache at `slot_mapping`, gathers each request's blocks, and
attends with per-request masks. Per-step metadata (`AttentionBatch`) is built once by the model
runner and shared by all layers; it reaches the attention function through a context variable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from baton.actors.kv_cache import PagedKVCache

ATTN_IMPLEMENTATION = "baton_paged"


@dataclass(slots=True)
class AttentionBatch:
    """Where this step's tokens go in the cache and what each may attend to.

    `q_index` scatters packed tokens into a `[B * max_query_len]` padded layout; it is None when
    every request runs exactly one token (pure decode), where packed and padded coincide.
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] flat slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks]
    query_pos: torch.Tensor  # [B, max_query_len] absolute position of each query (-1 = padding)
    context_lens: torch.Tensor  # [B] tokens in cache after this step
    max_context_len: int
    max_query_len: int
    q_index: torch.Tensor | None
    _masks: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.block_tables.shape[0]

    def mask(self, groups: int, window: int | None) -> torch.Tensor | None:
        """Boolean mask `[B, 1, groups * max_query_len, max_context_len]`, built once per step."""
        key = (groups, window or 0)
        if key in self._masks:
            return self._masks[key]
        if self.batch_size == 1 and self.max_query_len == 1 and not window:
            m = None  # one decoding request sees its whole context
        else:
            kpos = torch.arange(self.max_context_len, device=self.query_pos.device)
            qpos = self.query_pos.unsqueeze(-1)  # [B, Q, 1]
            m = kpos <= qpos
            if window:
                m &= kpos > qpos - window
            m &= kpos < self.context_lens.view(-1, 1, 1)
            m[:, :, 0] |= self.query_pos < 0  # padded query rows attend to something: no NaN
            m = m.unsqueeze(1).repeat(1, 1, groups, 1) if groups > 1 else m.unsqueeze(1)
        self._masks[key] = m
        return m


_current: ContextVar[AttentionBatch | None] = ContextVar("baton_attention_batch", default=None)


@contextlib.contextmanager
def attention_batch(batch: AttentionBatch) -> Iterator[None]:
    token = _current.set(batch)
    try:
        yield
    finally:
        _current.reset(token)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """Blocks `[N, bs, Hkv, D]` of each row of `block_tables` -> `[B, Hkv, length, D]`."""
    b, nb = block_tables.shape
    _, bs, hkv, d = cache.shape
    return cache[block_tables].view(b, nb * bs, hkv, d)[:, :length].transpose(1, 2)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: `query [1, H, T, D]`, `key/value [1, Hkv, T, D]`."""
    batch = _current.get()
    if batch is None:
        raise RuntimeError("baton_paged attention called outside an engine step")
    k_cache, v_cache = batch.cache.layer(module.layer_idx)
    _, n_heads, t, d = query.shape
    n_kv = key.shape[1]
    groups = n_heads // n_kv
    flat_k = k_cache.view(-1, n_kv, d)
    flat_v = v_cache.view(-1, n_kv, d)
    flat_k.index_copy_(0, batch.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    flat_v.index_copy_(0, batch.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))

    b, qlen = batch.batch_size, batch.max_query_len
    keys = gather_kv(k_cache, batch.block_tables, batch.max_context_len)
    values = gather_kv(v_cache, batch.block_tables, batch.max_context_len)
    if b == 1 and not sliding_window and (qlen == 1 or qlen == batch.max_context_len):
        # One request with nothing cached before its queries: plain causal attention, the very
        # call transformers' own sdpa path makes (so single-request results match it bit for bit).
        out = F.scaled_dot_product_attention(
            query, keys, values, is_causal=qlen > 1, scale=scaling, enable_gqa=groups > 1
        )
        return out.transpose(1, 2), None
    q = query[0].transpose(0, 1)  # [T, H, D]
    if batch.q_index is not None:
        padded = q.new_zeros(b * qlen, n_heads, d)
        padded.index_copy_(0, batch.q_index, q)
        q = padded
    # Fold each kv head's query group into the query axis: no KV repeat for grouped-query attn.
    q = q.view(b, qlen, n_kv, groups, d).permute(0, 2, 3, 1, 4).reshape(b, n_kv, groups * qlen, d)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=batch.mask(groups, sliding_window), scale=scaling
    )
    out = out.view(b, n_kv, groups, qlen, d).permute(0, 3, 1, 2, 4).reshape(b * qlen, n_heads, d)
    if batch.q_index is not None:
        out = out.index_select(0, batch.q_index)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
