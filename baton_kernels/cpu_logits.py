"""Greedy tokens and drafting candidates from vocabulary-wide logits, on the CPU kernels where
they are built (`cpu_logits.cpp`), else torch.

A verify step takes the argmax of every drafted row: 17 rows of 49k logits for a 16-token draft.
torch's CPU argmax does not vectorize (0.65 ms for 9 such rows here, 1.2 ms for 17, against a
20 ms step), so a greedy token costs Baton's kernel instead. It gives torch.argmax's answer
exactly: the first index of the largest value, a NaN larger than any number.
"""

from __future__ import annotations

from types import ModuleType

import torch

from baton.kernels import cpu_decode


def _kernel(logits: torch.Tensor) -> ModuleType | None:
    """The built kernels where they take these `[R, S]` logits (on the CPU, S > 0), else None."""
    if logits.device.type != "cpu" or logits.dim() != 2 or logits.shape[1] == 0:
        return None
    return cpu_decode.kernel()


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits [R, V]` -> `[R]` int64: `logits.argmax(dim=-1)`."""
    ext = _kernel(logits) if logits.dtype == torch.float32 else None
    return ext.argmax_rows(logits) if ext is not None else logits.argmax(dim=-1)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `k` largest logits as log-probabilities over the row, best first, and their
    column indices: `(logprobs [..., k] float32, indices [..., k])` for `logits [..., S]`."""
    k = min(k, logits.shape[-1])
    rows = logits.reshape(-1, logits.shape[-1])
    ext = (_kernel(rows) if logits.dtype in (torch.float32, torch.bfloat16) and 1 <= k <= 16
           else None)
    if ext is not None:
        lp, ids = ext.top_logprobs(rows, k)
        return lp.view(*logits.shape[:-1], k), ids.view(*logits.shape[:-1], k)
    top, ids = logits.topk(k, dim=-1)
    return top.float() - torch.logsumexp(logits.float(), -1, keepdim=True), ids
