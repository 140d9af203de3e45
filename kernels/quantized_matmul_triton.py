"""Triton kernel behind `quantized_matmul`: dequantize weight tiles in registers, then multiply.

int8 multiplies raw integers and applies each output channel's scale once at the end; int4 walks
K one group per step, so every tile has one scale and zero per output channel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64
INT8_BLOCK_K = 64


@triton.jit
def _quantized_matmul_kernel(
    x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w_mask = k_ok[:, None] & col_ok[None, :]
        if GROUP == 0:
            w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None], mask=w_mask, other=0)
            w = w.to(tl.float32)
        else:
            packed = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None] // 2, mask=w_mask,
                             other=0)
            q = (packed.to(tl.int32) >> ((k[:, None] % 2) * 4)) & 15
            group = k0 // GROUP
            scale = tl.load(scales_ptr + cols * stride_sn + group, mask=col_ok, other=0.0)
            zero = tl.load(zeros_ptr + cols * stride_sn + group, mask=col_ok, other=0.0)
            w = (q.to(tl.float32) - 8.0) * scale.to(tl.float32)[None, :] + \
                zero.to(tl.float32)[None, :]
        acc += tl.dot(x, w, input_precision=PRECISION)
    if GROUP == 0:
        acc *= tl.load(scales_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
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
        _quantized_matmul_kernel[grid](
            flat, qweight, scales, scales if zeros is None else zeros,
            flat if bias is None else bias, out, m, n, k,
            flat.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP=group_size, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
            BLOCK_K=group_size or INT8_BLOCK_K,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        )
    return out.view(*x.shape[:-1], n)
