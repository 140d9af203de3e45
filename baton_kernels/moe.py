"""Mixture-of-experts feed-forward as two grouped GEMMs over tokens sorted by expert.

Each token picks `top_k` experts. The `S * top_k` (token, expert) pairs are sorted by expert, so
every expert's rows lie together; one launch then computes the gate-up projection of all active
experts, and one more the down projection, each program taking a tile of one expert's rows.
Experts nobody picked cost nothing; pairs routed to expert id `num_experts` (transformers' mark for
"not on this rank") are dropped. Weights are stored as transformers stores them:
`gate_up [E, 2 * I, H]` (gate rows first), `down [E, H, I]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from baton.errors import ConfigError
from baton.kernels.dispatch import backend

Gate = Callable[[torch.Tensor], torch.Tensor]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `[..., 2 * I]` (gate first): most MoE models' activation."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor,
                apply_gate: Gate = silu_and_mul) -> torch.Tensor:
    """`[S, H]`: every token's experts applied and summed with its routing weights.

    `hidden [S, H]`, `top_k_index` and `top_k_weights` `[S, top_k]`; `apply_gate` maps the
    gate-up output `[rows, 2 * I]` to `[rows, I]`.
    """
    _check(hidden, top_k_index, top_k_weights, gate_up, down)
    if backend(hidden.device) == "triton":
        return moe_experts_grouped(hidden, top_k_index, top_k_weights, gate_up, down, apply_gate)
    return moe_experts_reference(hidden, top_k_index, top_k_weights, gate_up, down, apply_gate)


def moe_experts_grouped(hidden: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                        apply_gate: Gate = silu_and_mul) -> torch.Tensor:
    """The Triton path: sort pairs by expert, two grouped GEMMs, weighted sum per token."""
    s, top_k = top_k_index.shape
    pairs = expert_pairs_grouped(hidden, top_k_index, top_k_weights, gate_up, down, apply_gate)
    return sum_pairs(pairs, s, top_k, hidden.dtype)


def expert_pairs_grouped(hidden: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                         apply_gate: Gate = silu_and_mul) -> torch.Tensor:
    """`[S * top_k, H]`: each (token, expert) pair's weighted expert output, in the pairs' flat
    order; pairs routed to id `E` (`gate_up.shape[0]`) are dropped and come back as zeros. A
    pair's row depends on its token and expert alone, not on the other pairs in the launch: the
    expert cache computes a layer's pairs in parts over its slots and gets the same bits."""
    from baton.kernels.moe_triton import grouped_matmul

    num_experts = gate_up.shape[0]
    top_k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # Counted by scatter, not bincount: no device sync.
    counts = flat.new_zeros(num_experts + 1).scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts[:num_experts]
    tokens = order // top_k
    weights = top_k_weights.reshape(-1)[order]
    h = apply_gate(grouped_matmul(hidden, gate_up, counts, rows=tokens))
    out = grouped_matmul(h, down, counts, row_scale=weights)
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted


def sum_pairs(pairs: torch.Tensor, s: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """`[S, H]`: each token's `top_k` pair rows summed in float32."""
    return pairs.view(s, top_k, -1).float().sum(1).to(dtype)


def moe_experts_reference(hidden: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, gate_up: torch.Tensor,
                          down: torch.Tensor, apply_gate: Gate = silu_and_mul) -> torch.Tensor:
    """Expert by expert in float32, skipping experts nobody picked."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in top_k_index.unique().tolist():
        if e >= gate_up.shape[0]:
            continue
        token, slot = torch.where(top_k_index == e)
        x = hidden[token].float()
        h = apply_gate(x @ gate_up[e].float().T)
        y = h @ down[e].float().T * top_k_weights[token, slot, None].float()
        out.index_add_(0, token, y)
    return out.to(hidden.dtype)


def _check(hidden, top_k_index, top_k_weights, gate_up, down) -> None:
    if hidden.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape:
        raise ConfigError(f"MoE takes hidden [S, H] and top-k index/weights [S, k], got "
                          f"{tuple(hidden.shape)}, {tuple(top_k_index.shape)}, "
                          f"{tuple(top_k_weights.shape)}")
    e, two_i, h = gate_up.shape
    if h != hidden.shape[1] or two_i % 2 or down.shape != (e, h, two_i // 2):
        raise ConfigError(f"expert weights gate_up {tuple(gate_up.shape)} and down "
                          f"{tuple(down.shape)} do not fit hidden size {hidden.shape[1]} "
                          "(expected [E, 2I, H] and [E, H, I])")
