"""Routing-path predictor (ExpertFlow, a step at a time): each MoE layer's router logits for a
token, from its MoE input at the MoE layer before.

ExpertFlow predicts a token's whole path from its early hidden state. Measured on the moefied
default model (held-out text), a map from the first MoE layer's input reaches recall@4 0.63 over
the later layers; a map from the layer just before reaches 0.81, against 0.72 for applying the
next layer's own router to the same input (`lookahead`). Prefetching one layer ahead is all the
expert cache does, so the predictor learns that step for every layer.

One linear map per later layer (with a bias row), fitted in closed form by ridge regression onto
the layer's router logits (better than 0/1 targets of its top-k: recall@4 0.81 against 0.76), so
training takes seconds on a CPU. Saved as one safetensors file whose metadata names the model
shape it was trained for; a model of another shape, or a file of an older kind, is refused with a
`ConfigError` naming `moe_offload.predictor`.
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
    """`weight [targets, H + 1, E]`: per later MoE layer, a map from the MoE input of the layer
    before it (plus a constant) to its router logits."""

    def __init__(self, shape: ModelShape, weight: torch.Tensor, model: str = "") -> None:
        self.shape = shape
        self.weight = weight.float()
        self.model = model
        self._target_after = dict(zip(shape.moe_layers, range(len(shape.targets)), strict=False))

    @classmethod
    def fit(cls, shape: ModelShape, inputs: torch.Tensor, logits: torch.Tensor,
            model: str = "") -> RoutingPredictor:
        """Ridge fit: `inputs [N, targets, H]` (the MoE input of the layer before each target)
        onto `logits [N, targets, E]` (each target's router logits)."""
        maps = []
        for i in range(len(shape.targets)):
            x = _with_bias(inputs[:, i])
            gram = x.T @ x
            ridge = RIDGE * float(gram.diagonal().mean())
            maps.append(torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0]),
                                           x.T @ logits[:, i].float()))
        return cls(shape, torch.stack(maps), model)

    def next_scores(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """`[T, E]` scores (higher: likelier chosen) of the MoE layer after `layer`, from
        `layer`'s MoE inputs `hidden [T, H]`."""
        return self._scores(self._target_after[layer], hidden.reshape(-1, self.shape.hidden_size))

    def top_k(self, inputs: torch.Tensor) -> torch.Tensor:
        """`[N, targets, k]` predicted experts per token and later layer, from `inputs [N,
        targets, H]` (as in `fit`)."""
        scores = torch.stack([self._scores(i, inputs[:, i])
                              for i in range(len(self.shape.targets))], dim=1)
        return torch.topk(scores, self.shape.top_k, dim=-1).indices

    def _scores(self, target: int, x: torch.Tensor) -> torch.Tensor:
        """Map `target` (its weight rows, then its bias row) applied to MoE inputs `x [T, H]`."""
        w = self.weight[target]
        return torch.addmm(w[-1], x.float(), w[:-1])

    def evaluate(self, inputs: torch.Tensor, chosen: torch.Tensor,
                 popular: torch.Tensor) -> list[LayerScore]:
        """Per later layer, recall@k on `inputs` (as in `fit`) and `chosen [N, targets, k]`;
        `popular [targets, k]` are the experts most used per layer in training (the
        baseline)."""
        truth = _one_hot(chosen, self.shape.num_experts)  # [N, L, E]
        k, experts = self.shape.top_k, self.shape.num_experts
        found = truth.gather(-1, self.top_k(inputs)).sum(-1).mean(0) / k
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
        want = (len(shape.targets), shape.hidden_size + 1, shape.num_experts)
        if tuple(weight.shape) != want:
            raise ConfigError(f"{where} holds a predictor of an older kind (weight "
                              f"{list(weight.shape)}, not {list(want)}); {retrain}")
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
