"""Baton's MoE experts as transformers experts implementations.

transformers 5 keeps a MoE layer's experts as fused 3-D tensors (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`) behind an experts interface, and runs them by default through grouped
matrix multiplies. Baton registers two of its own there:

- "baton_grouped" (CUDA): `baton.kernels.moe`'s grouped GEMM.
- "baton_cpu" (CPU): tokens sorted by expert and one matmul pair per expert the tokens chose,
  on Baton's skinny bf16 kernel for a few rows where it takes the shapes (the weights are laid
  out for it once, at load). torch's CPU grouped matmul multiplies every expert's group in turn,
  empty or not, and oneDNN spends about 50 us on each small bf16 matmul (the skinny kernel 11 to
  14 us for the moefied default model's experts). The expert offload forward (`moe_offload`)
  runs the same arithmetic on the same layout from its cache's slots, so an offloaded model
  gives the resident one's bits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from baton.errors import ModelLoadError
from baton.kernels import cpu_decode
from baton.kernels.dispatch import backend
from baton.kernels.moe import moe_experts

log = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "baton_grouped"
CPU_IMPLEMENTATION = "baton_cpu"
SKINNY = "_baton_skinny_rows"  # on an experts module: its weights are `pack_experts`' layout


def fused_layout(experts: torch.nn.Module) -> bool:
    """Whether `experts` keeps the layout Baton's experts paths read: fused and gated
    (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`), not transposed, no bias."""
    return (getattr(experts, "has_gate", True) and getattr(experts, "is_concatenated", True)
            and not getattr(experts, "has_bias", False)
            and not getattr(experts, "is_transposed", False))


def check_fused_layout(experts: torch.nn.Module, what: str) -> None:
    """Raise `ModelLoadError` naming `what` (the Baton path) unless `fused_layout(experts)`."""
    if not fused_layout(experts):
        raise ModelLoadError(
            f"{type(experts).__name__} stores its experts in a layout {what} does not take "
            "(needs gate_up_proj [E, 2I, H] and down_proj [E, H, I], no bias)")


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward: `hidden_states [S, H]`, top-k index and weights `[S, k]`."""
    check_fused_layout(self, "Baton's grouped MoE")
    return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj,
                       self.down_proj, self._apply_gate)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)


@dataclass(slots=True)
class ByExpert:
    """A layer's token-expert pairs sorted by expert: `perm` orders the flattened `[T * k]`
    pairs, expert `e`'s rows are `starts[e]:starts[e + 1]`, `hit` lists the experts chosen."""

    perm: torch.Tensor
    starts: list[int]
    hit: list[int]

    def rows(self, e: int) -> slice:
        return slice(self.starts[e], self.starts[e + 1])


def by_expert(top_k_index: torch.Tensor, num_experts: int) -> ByExpert:
    """Sort `top_k_index [T, k]`'s pairs by expert."""
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    counts = torch.bincount(expert_ids, minlength=num_experts).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return ByExpert(perm, starts, [e for e, c in enumerate(counts) if c])


def expert_mlp(experts: torch.nn.Module, x: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """One expert's gated MLP on its rows `x`, from its `gate_up [2I, H]` and `down [H, I]`
    (laid out by `pack_experts` where the module says so)."""
    rows = getattr(experts, SKINNY, 0)
    if not rows:
        h = experts._apply_gate(x @ gate_up.T) @ down.T
    elif x.shape[0] <= rows:
        h = experts._apply_gate(_skinny(x, gate_up))
        h = _skinny(h, down)
    else:  # many rows (a prompt): the plain weights, unpacked for the call
        h = experts._apply_gate(x @ _unpacked(gate_up).T) @ _unpacked(down).T
    if experts.has_post_expert_norm:
        h = experts.post_expert_norm(h)
    return h


def skinny_expert_rows(gate_up: torch.Tensor, down: torch.Tensor) -> int:
    """Up to how many rows Baton's skinny CPU kernel runs one expert of these stacked weights
    (`[E, 2I, H]`, `[E, H, I]`); 0 where it does not take them (not bf16 on a CPU with the
    kernels, widths it cannot block)."""
    multiple = cpu_decode.skinny_row_multiple()
    if gate_up.shape[1] % multiple or down.shape[1] % multiple:
        return 0
    return min(cpu_decode.skinny_rows(gate_up[0]), cpu_decode.skinny_rows(down[0]))


def pack_experts(weight: torch.Tensor) -> torch.Tensor:
    """Stacked expert weights `[E, N, K]` with each expert laid out for the skinny kernel, in a
    tensor of the same shape (the same elements, reordered)."""
    return torch.stack([cpu_decode.pack_skinny(w).reshape(w.shape) for w in weight])


def _skinny(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return cpu_decode.skinny_linear(x, cpu_decode.skinny_view(weight), weight.shape[0])


def _unpacked(weight: torch.Tensor) -> torch.Tensor:
    return cpu_decode.unpack_skinny(cpu_decode.skinny_view(weight), weight.shape[0])


def combine(out: torch.Tensor, order: ByExpert, top_k_weights: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """The layer's output `[T, H]`: the experts' rows `out` (sorted by expert) weighted,
    put back in token order and summed over each token's k experts."""
    num_tokens, k = top_k_weights.shape
    perm = order.perm
    weighted = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    return weighted[inv_perm].view(num_tokens, k, out.shape[-1]).sum(dim=1).to(dtype)


def cpu_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward over the experts the tokens chose, one matmul pair each."""
    order = by_expert(top_k_index, self.num_experts)
    x = hidden_states[order.perm // top_k_index.shape[-1]]
    out = torch.empty(x.shape[0], hidden_states.shape[-1], dtype=hidden_states.dtype,
                      device=hidden_states.device)
    for e in order.hit:
        rows = order.rows(e)
        out[rows] = expert_mlp(self, x[rows], self.gate_up_proj[e], self.down_proj[e])
    return combine(out, order, top_k_weights, hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(CPU_IMPLEMENTATION, cpu_experts_forward)


def use_baton_experts(model, device: torch.device) -> str | None:
    """Route `model`'s resident MoE layers through Baton's experts: the grouped GEMM where the
    Triton kernel runs, else on the CPU the per-expert loop. Returns the implementation set
    (None: left as it was)."""
    if not getattr(model, "_can_set_experts_implementation", lambda: False)():
        return None
    resident = [m for m in model.modules()
                if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)]
    if not resident:  # none, or offloaded (the offload forward runs them)
        return None
    if backend(device) == "triton":
        name = EXPERTS_IMPLEMENTATION
    elif device.type == "cpu" and all(fused_layout(m) for m in resident):
        name = CPU_IMPLEMENTATION
        for m in resident:
            use_skinny(m, m.gate_up_proj, m.down_proj)
    else:
        return None
    model.set_experts_implementation(name)
    log.info("MoE layers run Baton's experts (%s)", name)
    return name


def use_skinny(experts: torch.nn.Module, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Lay `experts`' stacked weights (its own, or the ones an offload store will hold) out for
    the skinny kernel, in place, where it takes them."""
    rows = skinny_expert_rows(gate_up, down)
    if rows:
        with torch.no_grad():
            gate_up.copy_(pack_experts(gate_up))
            down.copy_(pack_experts(down))
        setattr(experts, SKINNY, rows)


