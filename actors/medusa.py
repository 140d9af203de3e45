"""Medusa-1 decoding heads: K extra next-next-token predictors on the model's last hidden state.

Head i is a residual block `h + SiLU(W_i h + b_i)` followed by the model's own LM head (shared and
frozen, never saved). Given the post-final-norm hidden state at the last verified position (the
one whose LM head output gave the next token t), head 0 predicts the token after t, head i the token
i + 1 after t. `W_i` and `b_i` start at zero, so a fresh head is the LM head itself.

Heads are saved as `medusa_heads.safetensors` plus `medusa_config.json` (K, hidden size, vocab,
base model name and fingerprint) and loaded against a model with `MedusaHeads.load(dir, model)`.
`propose_tree` turns one step's head logits into the sparse candidate tree the engine verifies.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from baton.actors.draft_tree import DraftTree
from baton.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "medusa_heads.safetensors"
CONFIG_FILE = "medusa_config.json"
FORMAT = "baton-medusa-1"


def model_dims(model: PreTrainedModel) -> tuple[int, int]:
    """(hidden size, vocab) of a causal LM: what its LM head consumes and produces."""
    hidden = int(model.config.get_text_config().hidden_size)
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or model.config.get_text_config().vocab_size
    return hidden, int(vocab)


def placement(model: PreTrainedModel) -> tuple[torch.device, torch.dtype]:
    """Where the model's weights live and in which dtype (its token embeddings')."""
    weight = model.get_input_embeddings().state_dict()["weight"]
    return weight.device, weight.dtype


def model_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the model's token embeddings and norm weights (in bf16).

    These survive Baton's run-time conversions (packed or quantized linears), so the same
    checkpoint gives the same fingerprint in a worker and in `baton train-heads`.
    """
    digest = hashlib.sha256()
    params = dict(model.named_parameters())
    embed = model.get_input_embeddings().state_dict()["weight"]
    tensors = [embed] + [params[n] for n in sorted(params) if "norm" in n]
    for t in tensors:
        raw = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:16]


class MedusaHeads(nn.Module):
    """K residual heads sharing the base model's LM head; `forward(hidden[N, H]) -> [K, N, V]`."""

    lm_head: nn.Module

    def __init__(self, lm_head: nn.Module, num_heads: int, hidden_size: int, vocab_size: int,
                 base_model: str = "", fingerprint: str = ""):
        super().__init__()
        if num_heads < 1:
            raise ConfigError(f"Medusa needs at least one head, got {num_heads}")
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.base_model = base_model
        self.fingerprint = fingerprint
        self.weight = nn.Parameter(torch.zeros(num_heads, hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_heads, hidden_size))
        # Shared with the model, not owned: kept out of parameters(), state_dict() and .to().
        object.__setattr__(self, "lm_head", lm_head)

    @classmethod
    def for_model(cls, model: PreTrainedModel, num_heads: int, base_model: str = "") -> MedusaHeads:
        """Fresh (zero-initialised) heads for `model`, on its device and in its dtype."""
        hidden, vocab = model_dims(model)
        heads = cls(model.get_output_embeddings(), num_heads, hidden, vocab, base_model,
                    model_fingerprint(model))
        return heads.to(*placement(model))

    def head_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [K, N, H]: each head's residual block output, what the LM head consumes."""
        proj = torch.einsum("nh,kgh->kng", hidden, self.weight) + self.bias[:, None, :]
        return hidden.unsqueeze(0) + F.silu(proj)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"Medusa heads take hidden states [N, {self.hidden_size}], "
                             f"got {tuple(hidden.shape)}")
        states = self.head_states(hidden)
        logits = self.lm_head(states.reshape(-1, self.hidden_size))
        return logits.reshape(self.num_heads, hidden.shape[0], -1)

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "num_heads": self.num_heads,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "base_model": self.base_model,
            "fingerprint": self.fingerprint,
        }

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the heads (float32) and their config into `directory`; `extra` joins the JSON."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().float().cpu().contiguous(),
                   "bias": self.bias.detach().float().cpu().contiguous()}
        save_file(tensors, str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps({**self.config(), **(extra or {})}, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path, model: PreTrainedModel) -> MedusaHeads:
        """Heads saved by `save`, attached to `model`'s LM head, on its device and dtype.

        Raises ConfigError when `directory` holds no heads or heads made for another model shape,
        ModelLoadError when the files are unreadable or inconsistent.
        """
        path = Path(directory).expanduser()
        retrain = f"train heads for this model: `baton train-heads --model <model> --out {path}`"
        cfg_path = path / CONFIG_FILE
        if not cfg_path.is_file() or not (path / WEIGHTS_FILE).is_file():
            raise ConfigError(
                f"no Medusa heads at {path} (expected {CONFIG_FILE} and {WEIGHTS_FILE}); {retrain}"
            )
        try:
            cfg = json.loads(cfg_path.read_text())
            num_heads, hidden, vocab = (int(cfg[k]) for k in
                                        ("num_heads", "hidden_size", "vocab_size"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{cfg_path} is not a Medusa heads config ({exc}); {retrain}"
                                 ) from exc
        model_hidden, model_vocab = model_dims(model)
        if (hidden, vocab) != (model_hidden, model_vocab):
            raise ConfigError(
                f"Medusa heads at {path} were trained for hidden size {hidden} and vocab {vocab} "
                f"({cfg.get('base_model') or 'unknown model'}), but this model has hidden size "
                f"{model_hidden} and vocab {model_vocab}; {retrain}"
            )
        try:
            tensors = load_file(str(path / WEIGHTS_FILE))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read {path / WEIGHTS_FILE}: {exc}; {retrain}") from exc
        expected = {"weight": (num_heads, hidden, hidden), "bias": (num_heads, hidden)}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if found != expected:
            raise ModelLoadError(f"{path / WEIGHTS_FILE} holds tensors {found}, its config says "
                                 f"{expected}; {retrain}")
        fingerprint = model_fingerprint(model)
        if cfg.get("fingerprint") and cfg["fingerprint"] != fingerprint:
            # Still lossless (verification decides), only fewer drafts will be accepted.
            log.warning("Medusa heads at %s were trained on %s, a different checkpoint than this "
                        "model; expect low acceptance (%s)", path, cfg.get("base_model"), retrain)
        heads = cls(model.get_output_embeddings(), num_heads, hidden, vocab,
                    str(cfg.get("base_model", "")), fingerprint)
        heads.load_state_dict(tensors)
        return heads.to(*placement(model)).eval().requires_grad_(False)


def propose_tree(next_token: int, head_logits: torch.Tensor, max_nodes: int,
                 top_k: int) -> DraftTree:
    """The sparse candidate tree after `next_token` (the root: sampled, its KV not yet computed).

    A node at depth d is one of head d-1's `top_k` tokens; its score is the product of the head
    probabilities along its path. The `max_nodes` best-scoring nodes are kept (best first, so
    every parent precedes its children, and a node never outscores its parent). Medusa-1 heads do
    not condition on drafted tokens, so every node at depth d chooses among the same tokens.
    `head_logits` is [K, V]: the heads' logits at the position that produced `next_token`.
    """
    if head_logits.dim() != 2:
        raise ValueError(f"head_logits must be [K, V], got {tuple(head_logits.shape)}")
    if top_k < 1 or max_nodes < 0:
        raise ValueError(f"need top_k >= 1 and max_nodes >= 0, got {top_k} and {max_nodes}")
    num_heads, vocab = head_logits.shape
    probs = torch.softmax(head_logits.float(), dim=-1)
    top_p, top_ids = probs.topk(min(top_k, vocab), dim=-1)
    p_rows, id_rows = top_p.tolist(), top_ids.tolist()
    tokens: list[int] = []
    parents: list[int] = []
    order = 0  # tie-break: earlier pushes (higher parents, better ranks) first
    frontier: list[tuple[float, int, int, int, int]] = []  # (-score, order, parent, depth, rank)
    for rank, p in enumerate(p_rows[0]):
        frontier.append((-p, order, -1, 0, rank))
        order += 1
    heapq.heapify(frontier)
    while frontier and len(tokens) < max_nodes:
        neg_score, _, parent, depth, rank = heapq.heappop(frontier)
        node = len(tokens)
        tokens.append(id_rows[depth][rank])
        parents.append(parent)
        if depth + 1 < num_heads:
            for child_rank, p in enumerate(p_rows[depth + 1]):
                heapq.heappush(frontier, (neg_score * p, order, node, depth + 1, child_rank))
                order += 1
    return DraftTree(tokens, parents)
