"""Pre-gating (Read-ME): one router decides every MoE layer's experts before the first one runs.

A pre-gated checkpoint (`baton moefy --pregate`) is a Mixtral checkpoint plus `pregate.safetensors`
(`weight [L, E, H]`: one row of router weights per MoE layer) and `baton_pregate` in its config.
At the first MoE layer the pre-gate scores all L layers' experts from that layer's MoE input, and
each layer then runs the top-k of its own row, weighted 1/k (moefy scales every expert's down
projection by k, so the layer's output is the sum of the chosen groups). Since the whole forward's
routing is known at its first MoE layer, the `pregate` offload policy can load every later layer's
experts while the early layers compute.

transformers alone loads the same directory as a plain Mixtral with per-layer routers (moefy
writes those too); Baton routes by the pre-gate wherever the config names one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from baton.errors import ModelLoadError

log = logging.getLogger(__name__)

CONFIG_KEY = "baton_pregate"  # config attribute naming the pre-gate's file in the checkpoint
WEIGHT = "weight"


class Pregate:
    """The pre-gate's weights `[L, E, H]` and its decision for the forward in progress."""

    def __init__(self, weight: torch.Tensor, top_k: int) -> None:
        self.weight = weight.float()
        self.top_k = top_k
        self.logits = torch.empty(0)  # [T, L, E] of the forward in progress
        self.indices = torch.empty(0, dtype=torch.long)  # [T, L, k]

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[1]

    def decide(self, hidden: torch.Tensor) -> None:
        """Score every layer's experts for the first MoE layer's inputs `hidden [T, H]`."""
        if self.weight.device != hidden.device:  # the model moved after the pre-gate was set
            self.weight = self.weight.to(hidden.device)
        flat = self.weight.reshape(-1, self.weight.shape[-1])
        logits = (hidden.float() @ flat.T).view(hidden.shape[0], self.num_layers, -1)
        self.logits = logits
        self.indices = logits.topk(self.top_k, dim=-1).indices


class PregateRouter(nn.Module):
    """Row `row` of the pre-gate in place of a layer's router: transformers' router interface
    (`hidden -> (logits, weights, indices)`); row 0 makes the decision for the whole forward."""

    def __init__(self, pregate: Pregate, row: int) -> None:
        super().__init__()
        self.pregate = pregate
        self.row = row

    def forward(self, hidden_states: torch.Tensor):
        hidden = hidden_states.reshape(-1, self.pregate.weight.shape[-1])
        if self.row == 0:
            self.pregate.decide(hidden)
        elif self.pregate.indices.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"pre-gated layer {self.row} got {hidden.shape[0]} tokens, the "
                               f"first MoE layer {self.pregate.indices.shape[0]}")
        indices = self.pregate.indices[:, self.row]
        weights = torch.full(indices.shape, 1.0 / self.pregate.top_k, dtype=torch.float32,
                             device=indices.device)
        return self.decided_logits(hidden), weights, indices

    def decided_logits(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's expert scores in the forward in progress, `[T, E]` (the pre-gate decided
        them at the first MoE layer; `hidden` is not needed)."""
        return self.pregate.logits[:, self.row]


def pregated_layers(model) -> list[nn.Module]:
    """The sparse-MoE blocks whose `gate` the pre-gate replaces, in layer order."""
    return [layer.mlp for layer in model.get_decoder().layers
            if getattr(getattr(layer, "mlp", None), "gate", None) is not None
            and getattr(layer.mlp, "experts", None) is not None]


def install(model, weight: torch.Tensor) -> Pregate:
    """Route `model`'s MoE layers by the pre-gate `weight [L, E, H]`; returns the shared state."""
    blocks = pregated_layers(model)
    text = model.config.get_text_config()
    experts = int(getattr(text, "num_local_experts", 0) or getattr(text, "num_experts", 0))
    hidden = int(text.hidden_size)
    if tuple(weight.shape) != (len(blocks), experts, hidden):
        raise ModelLoadError(
            f"the pre-gate's weight is {tuple(weight.shape)}; this model needs "
            f"{(len(blocks), experts, hidden)} (MoE layers, experts, hidden size): the file "
            f"belongs to another checkpoint")
    pregate = Pregate(weight, int(text.num_experts_per_tok))
    for row, block in enumerate(blocks):
        block.gate = PregateRouter(pregate, row)
    return pregate


def find(model) -> Pregate | None:
    """The pre-gate routing `model`, if one is installed."""
    for block in pregated_layers(model):
        if isinstance(block.gate, PregateRouter):
            return block.gate.pregate
    return None


def attach(model, path: str | Path) -> Pregate | None:
    """Install the pre-gate the checkpoint at `path` names in its config; None if it names none."""
    name = getattr(model.config, CONFIG_KEY, None)
    if not name:
        return None
    file = Path(path) / str(name)
    try:
        weight = load_file(str(file))[WEIGHT]
    except (OSError, KeyError) as exc:
        raise ModelLoadError(
            f"the config at {path} names the pre-gate {name!r} ({CONFIG_KEY}), which cannot be "
            f"read: {exc}; restore the file or drop {CONFIG_KEY} from config.json") from exc
    pregate = install(model, weight)
    log.info("routing %d MoE layers by the pre-gate in %s", pregate.num_layers, file)
    return pregate


def save_pregate(weight: torch.Tensor, model, out: Path, file: str = "pregate.safetensors") -> None:
    """Write the pre-gate beside a checkpoint at `out` and name it in `model`'s config (save the
    config after this)."""
    save_file({WEIGHT: weight.float().contiguous()}, str(out / file))
    setattr(model.config, CONFIG_KEY, file)
