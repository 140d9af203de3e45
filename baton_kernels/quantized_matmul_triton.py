"""Triton kernel behind `quantized_matmul`: dequantize weight tiles in registers, then multiply.

int8 multiplies raw integers and applies each output channel's scale once at the end. int4 walks
K one group per step (one scale and zero per output channel a tile), reads whole packed bytes and
interleaves their low and high nibbles back into K order in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.dispatch import dot_operands

BLOCK_N = 32  # narrow tiles: at decode (M = 1) the grid must still cover every multiprocessor
INT8_BLOCK_K = 128
NUM_STAGES = 4
NUM_WARPS = 4


@triton.jit
def _quantized_matmul_kernel(
    x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if GROUP == 0:
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            k_ok = k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            # Weight rows as stored (K contiguous), transposed in registers: coalesced reads.
            w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0)
            acc += tl.dot(x.to(DOT), tl.trans(w.to(DOT)), input_precision=PRECISION)
        acc *= tl.load(scales_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        kb = tl.arange(0, GROUP // 2)  # bytes of one group
        kx = tl.arange(0, GROUP)
        for k0 in range(0, K, GROUP):
            packed = tl.load(w_ptr + cols[:, None] * stride_wn + (k0 // 2 + kb)[None, :],
                             mask=col_ok[:, None], other=0)
            q = tl.interleave(packed & 15, packed >> 4)  # [BLOCK_N, GROUP] in K order
            group = k0 // GROUP
            scale = tl.load(scales_ptr + cols * stride_sn + group, mask=col_ok, other=0.0)
            zero = tl.load(zeros_ptr + cols * stride_sn + group, mask=col_ok, other=0.0)
            scale = scale.to(tl.float32)[:, None]
            offset = zero.to(tl.float32)[:, None] - 8.0 * scale  # w = q * scale + offset
            w = (q.to(tl.float32) * scale + offset).to(DOT)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + kx)[None, :],
                        mask=row_ok[:, None], other=0.0)
            acc += tl.dot(x.to(DOT), tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def quantized_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor | None, bias: torch.Tensor | None,
                            group_size: int) -> torch.Tensor:
    """`x [..., K] @ w.T`; `group_size` 0 for int8 per channel, else int4 with that group."""
    k = x.shape[-1]
    flat = x.reshape(-1, k).contiguous()
    m, n = flat.shape[0], qweight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
        dot, precision = dot_operands(x.dtype)
        _quantized_matmul_kernel[grid](
            flat, qweight, scales, scales if zeros is None else zeros,
            flat if bias is None else bias, out, m, n, k,
            flat.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP=group_size, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
            BLOCK_K=INT8_BLOCK_K, DOT=dot, PRECISION=precision,
            num_stages=NUM_STAGES, num_warps=NUM_WARPS,
        )
    return out.view(*x.shape[:-1], n)
