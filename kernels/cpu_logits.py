"""Greedy tokens and drafting candidates from vocabulary-wide logits, on the CPU kernels where
they are built (`cpu_logits.cpp`), else torch.

A verify step takes the argmax of every drafted row: 17 rows of 49k logits for a 16-token draft.
torch's CPU argmax does not vectorize (0.65 ms for 9 such rows here, 1.2 ms for 17, against a
20 ms step), so a greedy token costs Baton's kernel instead. It gives torch.argmax's answer
exactly: the first index of the largest value, a NaN larger than any number.
"""

from __future__ import annotations

import torch

from baton.kernels import cpu_decode


def _kernel_takes(logits: torch.Tensor) -> bool:
    return (logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[1] > 0
            and cpu_decode.kernel() is not None)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits [R, V]` -> `[R]` int64: `logits.argmax(dim=-1)`."""
    if logits.dtype == torch.float32 and _kernel_takes(logits):
        ext = cpu_decode.kernel()
        assert ext is not None
        return ext.argmax_rows(logits)
    return logits.argmax(dim=-1)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `k` largest logits as log-probabilities over the row, best first, and their
    column indices: `(logprobs [..., k] float32, indices [..., k])` for `logits [..., S]`."""
    k = min(k, logits.shape[-1])
    if (logits.dtype in (torch.float32, torch.bfloat16) and 1 <= k <= 16
            and _kernel_takes(logits.reshape(-1, logits.shape[-1]))):
        ext = cpu_decode.kernel()
        assert ext is not None
        lp, ids = ext.top_logprobs(logits.reshape(-1, logits.shape[-1]), k)
        return lp.view(*logits.shape[:-1], k), ids.view(*logits.shape[:-1], k)
    top, ids = logits.topk(k, dim=-1)
    return top.float() - torch.logsumexp(logits.float(), -1, keepdim=True), ids
