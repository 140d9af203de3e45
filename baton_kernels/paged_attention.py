"""Attention of a few new queries per sequence against keys and values in paged KV blocks.

Two uses of one function: decode (every sequence brings one query, the token it just appended)
and verify (each sequence brings a short run of draft tokens, causal among themselves, as
speculative decoding checks them). Queries are packed `[T, heads, head_dim]`; sequence `b` owns
rows `query_start[b]:query_start[b + 1]`, the last `n_b` positions of its `context_lens[b]` tokens,
whose keys and values are already in the cache. Grouped-query attention reads each kv head once
for its whole query group. A draft tree (lookahead, Medusa) verifies under `tree_mask`: row `t`
of it says which queries of `t`'s own run `t` may see (its ancestors and itself), where a chain
sees every earlier one.
"""

from __future__ import annotations

import torch

from baton.errors import ConfigError
from baton.kernels.dispatch import backend


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor | None = None,
    max_query_len: int = 1,
    scale: float | None = None,
    sliding_window: int | None = None,
    tree_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[T, heads, head_dim]` attention outputs for packed `query` (same dtype).

    `k_cache`/`v_cache`: `[kv_heads, num_blocks, block_size, head_dim]`; `block_tables [B, nb]`
    and `context_lens [B]` (tokens in cache, new ones included). Without `query_start` every
    sequence has exactly one query (decode, `T == B`); with it (`[B + 1]`, cumulative) pass the
    longest run as `max_query_len`. `tree_mask [T, max_query_len]` (bool), when given, narrows
    what each query sees of its own run: row `t`, column `j`: the run's query `j`.
    """
    _check(query, k_cache, v_cache, block_tables, context_lens, query_start, max_query_len)
    if tree_mask is not None and (query_start is None
                                  or tuple(tree_mask.shape) != (len(query), max_query_len)):
        raise ConfigError(f"tree_mask must be [T, max_query_len] = [{len(query)}, "
                          f"{max_query_len}] with query_start, got {tuple(tree_mask.shape)}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if backend(query.device) == "triton":
        from baton.kernels.paged_attention_triton import paged_attention_triton

        return paged_attention_triton(query, k_cache, v_cache, block_tables, context_lens,
                                      query_start, max_query_len, scale, sliding_window or 0,
                                      tree_mask)
    return paged_attention_reference(query, k_cache, v_cache, block_tables, context_lens,
                                     query_start, scale, sliding_window, tree_mask)


def paged_attention_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor | None,
    scale: float,
    sliding_window: int | None = None,
    tree_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One sequence at a time, in float32: gather its blocks, mask, softmax."""
    hkv, _, bs, d = k_cache.shape
    groups = query.shape[1] // hkv
    batch = len(context_lens)
    starts = torch.arange(batch + 1) if query_start is None else query_start.cpu()
    out = torch.zeros_like(query)
    for b in range(batch):
        ctx = int(context_lens[b])
        lo, hi = int(starts[b]), int(starts[b + 1])
        ids = block_tables[b, : -(-ctx // bs)]
        keys = k_cache[:, ids].reshape(hkv, -1, d)[:, :ctx].float().repeat_interleave(groups, 0)
        vals = v_cache[:, ids].reshape(hkv, -1, d)[:, :ctx].float().repeat_interleave(groups, 0)
        q = query[lo:hi].float().transpose(0, 1)  # [H, n, D]
        scores = q @ keys.transpose(1, 2) * scale
        qpos = torch.arange(ctx - (hi - lo), ctx, device=query.device).view(-1, 1)
        kpos = torch.arange(ctx, device=query.device)
        visible = kpos <= qpos
        if sliding_window:
            visible &= kpos > qpos - sliding_window
        if tree_mask is not None:
            n = hi - lo
            visible[:, ctx - n:] &= tree_mask[lo:hi, :n].to(visible.device)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[lo:hi] = (probs @ vals).transpose(0, 1).to(query.dtype)
    return out


def _check(query, k_cache, v_cache, block_tables, context_lens, query_start,
           max_query_len) -> None:
    if query.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ConfigError(
            f"paged attention takes query [T, heads, head_dim] and caches [kv_heads, blocks, "
            f"block_size, head_dim], got {tuple(query.shape)} and {tuple(k_cache.shape)}")
    if query.shape[-1] != k_cache.shape[-1] or query.shape[1] % k_cache.shape[0]:
        raise ConfigError(f"{query.shape[1]} query heads of {query.shape[-1]} do not group over "
                          f"{k_cache.shape[0]} kv heads of {k_cache.shape[-1]}")
    if block_tables.dim() != 2 or len(block_tables) != len(context_lens):
        raise ConfigError(f"block_tables {tuple(block_tables.shape)} must be [B, blocks] with B "
                          f"= {len(context_lens)} context lengths")
    if query_start is None and len(query) != len(context_lens):
        raise ConfigError(f"decode takes one query per sequence: {len(query)} queries for "
                          f"{len(context_lens)} sequences (pass query_start for several)")
    if query_start is not None and len(query_start) != len(context_lens) + 1:
        raise ConfigError(f"query_start needs B + 1 = {len(context_lens) + 1} entries, got "
                          f"{len(query_start)}")
    if max_query_len < 1:
        raise ConfigError(f"max_query_len must be >= 1, got {max_query_len}")
