"""Triton kernel behind `paged_attention`: one program per (sequence, kv head).

The program holds the queries of a whole kv-head group (every query head of the group times
every query of the sequence) as the rows of one tile, walks the sequence's context `BLOCK_N`
positions at a time (looking each position's block up in the block table, so any cache block
size works) and keeps an online softmax in float32. With a tree mask (`TREE`), a query sees the
earlier queries of its own run only where its mask row says so (a draft tree's ancestors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.errors import ConfigError
from baton.kernels.dispatch import dot_operands

BLOCK_N = 32  # context positions per step


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, ctx_ptr, qstart_ptr, tree_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kh, stride_kb, stride_kt,
    stride_table, stride_tree, scale, window,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr, TREE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    if VARLEN:
        q_lo = tl.load(qstart_ptr + seq)
        q_len = tl.load(qstart_ptr + seq + 1) - q_lo
    else:
        q_lo = seq
        q_len = 1

    rows = tl.arange(0, BLOCK_G * BLOCK_Q)
    g = rows // BLOCK_Q
    qi = rows % BLOCK_Q
    row_ok = (g < GROUPS) & (qi < q_len)
    qpos = ctx - q_len + qi
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_off = (q_lo + qi) * stride_qt + (kvh * GROUPS + g) * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT)

    m_i = tl.full([BLOCK_G * BLOCK_Q], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_G * BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_G * BLOCK_Q, BLOCK_D], tl.float32)
    # A sliding window skips the context no query can see.
    first = tl.where(window > 0, tl.maximum(ctx - q_len + 1 - window, 0) // BLOCK_N * BLOCK_N, 0)
    cols = tl.arange(0, BLOCK_N)
    for start in range(first, ctx, BLOCK_N):
        kpos = start + cols
        k_ok = kpos < ctx
        block = tl.load(tables_ptr + seq * stride_table + kpos // CACHE_BLOCK, mask=k_ok, other=0)
        kv_off = kvh * stride_kh + block.to(tl.int64) * stride_kb + (kpos % CACHE_BLOCK) * stride_kt
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION) * scale
        visible = k_ok[None, :] & (kpos[None, :] <= qpos[:, None]) & row_ok[:, None]
        if window > 0:
            visible = visible & (kpos[None, :] > qpos[:, None] - window)
        if TREE:
            # Keys inside the query run: the query's mask row decides (ancestors and itself).
            run_lo = ctx - q_len
            in_run = kpos[None, :] >= run_lo
            m_off = (q_lo + qi)[:, None] * stride_tree + (kpos - run_lo)[None, :]
            allowed = tl.load(tree_ptr + m_off, mask=visible & in_run, other=0)
            visible = visible & ((allowed != 0) | (kpos[None, :] < run_lo))
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_lo + qi) * stride_ot + (kvh * GROUPS + g) * stride_oh
    tl.store(out_ptr + o_off[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def paged_attention_triton(query, k_cache, v_cache, block_tables, context_lens, query_start,
                           max_query_len, scale, window, tree_mask=None) -> torch.Tensor:
    hkv, _, cache_block, d = k_cache.shape
    if k_cache.stride(-1) != 1 or query.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ConfigError("paged attention needs the head_dim axis contiguous in query and caches")
    groups = query.shape[1] // hkv
    out = torch.empty_like(query)
    batch = len(context_lens)
    if batch == 0:
        return out
    varlen = query_start is not None
    # tl.dot wants tiles of at least 16 rows and columns.
    block_g = triton.next_power_of_2(groups)
    block_q = triton.next_power_of_2(max_query_len if varlen else 1)
    block_q = max(block_q, triton.cdiv(16, block_g))
    tables = block_tables.to(torch.int32)
    tree = tree_mask.to(torch.int8) if tree_mask is not None else tables
    dot, precision = dot_operands(query.dtype)
    _paged_attention_kernel[(batch, hkv)](
        query, k_cache, v_cache, out, tables, context_lens.to(torch.int32),
        query_start.to(torch.int32) if varlen else tables, tree,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        tree.stride(0), scale, window,
        GROUPS=groups, HEAD_DIM=d, CACHE_BLOCK=cache_block, BLOCK_G=block_g, BLOCK_Q=block_q,
        BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)), VARLEN=varlen,
        TREE=tree_mask is not None, DOT=dot, PRECISION=precision,
    )
    return out
