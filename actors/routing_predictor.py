"""Routing-path predictor (ExpertFlow): every later MoE layer's experts for a token, from its MoE
input at the first MoE layer.

One linear map per later layer (all stacked in one matrix, with a bias row), fitted in closed form
by ridge regression onto the layers' top-k choices as 0/1 targets, so training takes seconds on
a CPU. Saved as one safetensors file whose metadata names the model shape it was trained for; a
model of another shape refuses it with a `ConfigError` naming `moe_offload.predictor`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from baton.errors import ConfigError

log = logging.getLogger(__name__)

META_KEY = "baton_routing_predictor"
RIDGE = 1e-2  # regularization, relative to the mean feature energy


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What a predictor must agree with: the model's MoE layer indices, experts per layer, top-k
    and the width of the MoE input."""

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int

    @property
    def targets(self) -> tuple[int, ...]:
        """The layers predicted: every MoE layer after the first."""
        return self.moe_layers[1:]


@dataclass(frozen=True, slots=True)
class LayerScore:
    """Held-out quality of one predicted layer: the share of each token's true top-k experts
    found among the predicted top-k (precision and recall@k coincide: both sets hold k), next to
    always guessing the layer's k most used experts and to chance (k / experts)."""

    layer: int
    recall_at_k: float
    popular_recall_at_k: float
    chance: float


class RoutingPredictor:
    """`weight [H + 1, targets x E]` over the first MoE layer's input (plus a constant)."""

    def __init__(self, shape: ModelShape, weight: torch.Tensor, model: str = "") -> None:
        self.shape = shape
        self.weight = weight.float()
        self.model = model

    @classmethod
    def fit(cls, shape: ModelShape, hidden: torch.Tensor, chosen: torch.Tensor,
            model: str = "") -> RoutingPredictor:
        """Ridge fit on `hidden [N, H]` (first MoE layer inputs) and `chosen [N, targets, k]`
        (each later layer's top-k experts)."""
        x = _with_bias(hidden)
        y = _one_hot(chosen, shape.num_experts).flatten(1)
        gram = x.T @ x
        ridge = RIDGE * float(gram.diagonal().mean())
        weight = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0]), x.T @ y)
        return cls(shape, weight, model)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[T, targets, E]` scores (higher: likelier chosen) for MoE inputs `hidden [T, H]`."""
        flat = _with_bias(hidden.reshape(-1, self.shape.hidden_size)) @ self.weight
        return flat.view(flat.shape[0], len(self.shape.targets), self.shape.num_experts)

    def top_k(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[T, targets, k]` predicted experts per token and later layer."""
        return torch.topk(self.scores(hidden), self.shape.top_k, dim=-1).indices

    def evaluate(self, hidden: torch.Tensor, chosen: torch.Tensor,
                 popular: torch.Tensor) -> list[LayerScore]:
        """Per later layer, recall@k on `hidden`/`chosen` (as in `fit`); `popular [targets, k]`
        are the experts most used per layer in training (the baseline)."""
        truth = _one_hot(chosen, self.shape.num_experts)  # [N, L, E]
        k, experts = self.shape.top_k, self.shape.num_experts
        found = truth.gather(-1, self.top_k(hidden)).sum(-1).mean(0) / k
        base = truth.gather(-1, popular.unsqueeze(0).expand(len(truth), -1, -1)).sum(-1).mean(0)
        return [LayerScore(layer, float(found[i]), float(base[i]) / k, k / experts)
                for i, layer in enumerate(self.shape.targets)]

    def to(self, device: torch.device) -> RoutingPredictor:
        """This predictor with its weight on `device` (where the MoE inputs are)."""
        return RoutingPredictor(self.shape, self.weight.to(device), self.model)

    def save(self, path: str | Path) -> None:
        meta = {**asdict(self.shape), "model": self.model}
        save_file({"weight": self.weight.contiguous()}, str(path),
                  metadata={META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, expected: ModelShape, model: str = "the model"
             ) -> RoutingPredictor:
        """The predictor at `path`; `ConfigError` naming `moe_offload.predictor` when it is
        missing, not a predictor, or trained for a model of another shape than `expected`."""
        where = f"moe_offload.predictor {str(path)!r}"
        retrain = f"train one with `baton train-experts --model <{model}> --out {path}`"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[META_KEY])
            weight = load_file(str(path))["weight"]
            trained_for = meta.pop("model", "")
            shape = ModelShape(tuple(meta["moe_layers"]), meta["num_experts"], meta["top_k"],
                               meta["hidden_size"])
        except FileNotFoundError as exc:
            raise ConfigError(f"{where} does not exist; {retrain}") from exc
        except (SafetensorError, KeyError, OSError, ValueError) as exc:
            raise ConfigError(f"{where} is not a routing predictor file ({exc}); "
                              f"{retrain}") from exc
        if shape != expected:
            raise ConfigError(
                f"{where} was trained for {trained_for or 'another model'} ({_describe(shape)}); "
                f"{model} has {_describe(expected)}: {retrain}")
        if trained_for and trained_for != model:
            log.warning("routing predictor %s was trained for %s, not %s: its shape fits, its "
                        "predictions may not", path, trained_for, model)
        return cls(shape, weight, trained_for)


def popular_experts(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[targets, k]`: each layer's k most chosen experts in `chosen [N, targets, k]`."""
    counts = _one_hot(chosen, num_experts).sum(0)
    return torch.topk(counts, chosen.shape[-1], dim=-1).indices


def _describe(shape: ModelShape) -> str:
    return (f"MoE layers {list(shape.moe_layers)}, {shape.num_experts} experts, top-"
            f"{shape.top_k}, hidden size {shape.hidden_size}")


def _with_bias(hidden: torch.Tensor) -> torch.Tensor:
    x = hidden.float()
    return torch.cat([x, torch.ones(x.shape[0], 1, device=x.device)], dim=1)


def _one_hot(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[N, L, E]` 0/1 targets from `[N, L, k]` expert indices."""
    out = torch.zeros(*chosen.shape[:-1], num_experts)
    return out.scatter_(-1, chosen.long(), 1.0)
