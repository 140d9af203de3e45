"""Triton grouped GEMM for `moe`: one launch multiplies every expert's rows by its own weight.

Rows arrive sorted by expert with `counts[e]` rows each. Program `(t, n)` takes the `t`-th tile of
`BLOCK_M` rows across all experts (an expert's last tile may be short; the launch has at most one
tile per expert more than the rows need, and spare programs store nothing), so the grid needs no
host sync to size it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.dispatch import dot_operands

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 128
NUM_STAGES = 4  # deeper prefetch of weight tiles: the GEMM is bound by reading them


@triton.jit
def _grouped_matmul_kernel(
    a_ptr, w_ptr, out_ptr, tile_end_ptr, row_start_ptr, counts_ptr, rows_ptr, scale_ptr,
    N, K, num_experts, stride_am, stride_we, stride_wn, stride_om,
    GATHER: tl.constexpr, SCALE: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    # tile_end[e] = tiles of experts 0..e; this tile belongs to the first expert ending past it.
    ends = tl.load(tile_end_ptr + experts, mask=experts < num_experts, other=2**30)
    e = tl.sum((ends <= tile).to(tl.int32), 0)
    spare = e >= num_experts
    e = tl.minimum(e, num_experts - 1)
    count = tl.load(counts_ptr + e)
    tiles_before = tl.load(tile_end_ptr + e) - tl.cdiv(count, BLOCK_M)
    first = tl.load(row_start_ptr + e)
    local = (tile - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < tl.where(spare, 0, count)
    rows = first + local
    a_rows = tl.load(rows_ptr + rows, mask=row_ok, other=0) if GATHER else rows

    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, tl.where(spare, 0, K), BLOCK_K):  # spare programs skip the work
        k = k0 + ks
        k_ok = k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # Weight rows as stored (K contiguous), transposed in registers: coalesced reads.
        w = tl.load(w_base + cols[:, None] * stride_wn + k[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(a.to(DOT), tl.trans(w.to(DOT)), input_precision=PRECISION)
    if SCALE:
        acc *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def grouped_matmul(a: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                   rows: torch.Tensor | None = None,
                   row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`out[r] = a[rows[r]] @ weights[e(r)].T (* row_scale[r])` for rows sorted by expert.

    `weights [E, N, K]`, `counts [E]` rows per expert; `rows` gathers `a` (else `a` is already
    sorted). Rows past `counts.sum()` (pairs for no expert here) come back as zeros.
    """
    num_experts, n, k = weights.shape
    total = len(rows) if rows is not None else a.shape[0]
    out = torch.zeros(total, n, dtype=a.dtype, device=a.device)
    if total == 0:
        return out
    a = a.contiguous()
    weights = weights.contiguous()
    tile_end = torch.cumsum(torch.div(counts + BLOCK_M - 1, BLOCK_M, rounding_mode="floor"), 0)
    row_start = torch.cumsum(counts, 0) - counts
    grid = (triton.cdiv(total, BLOCK_M) + num_experts, triton.cdiv(n, BLOCK_N))
    dot, precision = dot_operands(a.dtype)
    _grouped_matmul_kernel[grid](
        a, weights, out, tile_end, row_start, counts,
        rows if rows is not None else counts, row_scale if row_scale is not None else a,
        n, k, num_experts, a.stride(0), weights.stride(0), weights.stride(1), out.stride(0),
        GATHER=rows is not None, SCALE=row_scale is not None,
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, DOT=dot, PRECISION=precision, num_stages=NUM_STAGES,
    )
    return out
