"""Medusa-1 decoding heads: K extra next-next-token predictors on the model's last hidden state.

Head i is a residual block `h + SiLU(W_i h + b_i)` followed by the model's own LM head (shared and
frozen, never saved). Given the post-final-norm hidden state at the last verified position (the
one whose LM head output gave the next token t), head 0 predicts the token after t, head i the token
i + 1 after t. `W_i` and `b_i` start at zero, so a fresh head is the LM head itself.

Heads are saved as `medusa_heads.safetensors` plus `medusa_config.json` (K, hidden size, vocab,
base model name and fingerprint) and loaded against a model with `MedusaHeads.load(dir, model)`.
Training may also save `vocab`, the tokens the heads learnt to rank (the model's likeliest tokens
anywhere in its training text): serving then scores only those, a few thousand rows of the LM
head instead of all of it, and the heads' untrained logits elsewhere cannot win a draft.
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

from baton.actors.cpu_linear import PackedLinear, packing_supported
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
        self.vocab: torch.Tensor | None = None  # sorted token ids the heads rank; None: all
        # Shared with the model, not owned: kept out of parameters(), state_dict() and .to().
        object.__setattr__(self, "lm_head", lm_head)
        # Built by `prepare_serving` from the weights above: all heads' projections as one linear,
        # and the LM head's rows for `vocab`.
        self._proj: nn.Module | None = None
        self._draft_head: nn.Module | None = None

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
        """[N, H] -> [K, N, V]: every head's logits over the full vocabulary."""
        self._check(hidden)
        states = self.head_states(hidden)
        logits = self.lm_head(states.reshape(-1, self.hidden_size))
        return logits.reshape(self.num_heads, hidden.shape[0], -1)

    def candidates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What drafting reads: ([K, N, S] logits, the [S] token ids they score), over `vocab`
        when the heads have one (token ids None: the full vocabulary, S = V). Runs the layers
        `prepare_serving` built (on first use, if nobody called it)."""
        self._check(hidden)
        if self._proj is None or self._draft_head is None:
            self.prepare_serving()
        assert self._proj is not None and self._draft_head is not None
        n = hidden.shape[0]
        proj = self._proj(hidden).view(n, self.num_heads, self.hidden_size).transpose(0, 1)
        states = hidden.unsqueeze(0) + F.silu(proj)  # = head_states(hidden), one GEMM
        logits = self._draft_head(states.reshape(-1, self.hidden_size))
        return logits.view(self.num_heads, n, -1), self.vocab

    def prepare_serving(self) -> MedusaHeads:
        """Fold the heads into one linear and cut the LM head down to `vocab` (packed for oneDNN
        where it can), for `candidates`; call again after changing the weights or `vocab`."""
        # Plain tensors, also when first used under inference mode (from `candidates`).
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = self.weight.detach(), self.bias.detach()
            proj = nn.Linear(self.hidden_size, self.num_heads * self.hidden_size,
                             device=weight.device, dtype=weight.dtype)
            proj.weight.copy_(weight.reshape(-1, self.hidden_size))
            proj.bias.copy_(bias.reshape(-1))
            head: nn.Module = self.lm_head
            if self.vocab is not None:
                lm_weight, lm_bias = linear_params(self.lm_head)
                head = nn.Linear(self.hidden_size, int(self.vocab.numel()),
                                 bias=lm_bias is not None, device=weight.device,
                                 dtype=lm_weight.dtype)
                head.weight.copy_(lm_weight[self.vocab])
                if lm_bias is not None:
                    head.bias.copy_(lm_bias[self.vocab])
            if packing_supported(weight.dtype, weight.device):
                proj = PackedLinear(proj)
                head = PackedLinear(head) if isinstance(head, nn.Linear) else head
        object.__setattr__(self, "_proj", proj)
        object.__setattr__(self, "_draft_head", head)
        return self

    def train(self, mode: bool = True) -> MedusaHeads:
        """Training changes the weights: the serving layers are rebuilt on next use."""
        if mode:
            object.__setattr__(self, "_proj", None)
            object.__setattr__(self, "_draft_head", None)
        return super().train(mode)

    def _check(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"Medusa heads take hidden states [N, {self.hidden_size}], "
                             f"got {tuple(hidden.shape)}")

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
        if self.vocab is not None:
            tensors["vocab"] = self.vocab.cpu().contiguous()
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
        vocab_ids = tensors.pop("vocab", None)
        expected = {"weight": (num_heads, hidden, hidden), "bias": (num_heads, hidden)}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        bad_vocab = vocab_ids is not None and (
            vocab_ids.dim() != 1 or vocab_ids.dtype != torch.int64 or vocab_ids.numel() == 0
            or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab)
        if found != expected or bad_vocab:
            raise ModelLoadError(f"{path / WEIGHTS_FILE} holds tensors {found}"
                                 f"{' and a bad vocab' if bad_vocab else ''}, its config says "
                                 f"{expected}; {retrain}")
        fingerprint = model_fingerprint(model)
        if cfg.get("fingerprint") and cfg["fingerprint"] != fingerprint:
            # Still lossless (verification decides), only fewer drafts will be accepted.
            log.warning("Medusa heads at %s were trained on %s, a different checkpoint than this "
                        "model; expect low acceptance (%s)", path, cfg.get("base_model"), retrain)
        heads = cls(model.get_output_embeddings(), num_heads, hidden, vocab,
                    str(cfg.get("base_model", "")), fingerprint)
        heads.load_state_dict(tensors)
        heads = heads.to(*placement(model)).eval().requires_grad_(False)
        if vocab_ids is not None:
            heads.vocab = vocab_ids.to(heads.weight.device)
        return heads.prepare_serving()


def linear_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's plain [out, in] weight and its bias (packed layers unpack theirs)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ConfigError("Medusa heads need a plain linear LM head (load the model unquantized)")
    bias = getattr(module, "bias", None)
    return weight.detach(), bias.detach() if isinstance(bias, torch.Tensor) else None


def top_candidates(head_logits: torch.Tensor, top_k: int, token_ids: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's `top_k` tokens and their probabilities, for any leading shape:
    `head_logits [..., S]` over `token_ids [S]` (None: the whole vocabulary) ->
    (probabilities [..., top_k], token ids [..., top_k]), best first."""
    if top_k < 1:
        raise ValueError(f"need top_k >= 1, got {top_k}")
    top_logits, top_ids = head_logits.topk(min(top_k, head_logits.shape[-1]), dim=-1)
    probs = (top_logits.float() - torch.logsumexp(head_logits.float(), -1, keepdim=True)).exp()
    return probs, top_ids if token_ids is None else token_ids[top_ids]


def propose_tree(head_logits: torch.Tensor, max_nodes: int, top_k: int,
                 token_ids: torch.Tensor | None = None) -> tuple[DraftTree, list[float]]:
    """The sparse candidate tree after the next token (the root: sampled, its KV not yet
    computed), and each node's score; `head_logits` is [K, S]: the heads' logits at the position
    that produced the next token, over `token_ids [S]` (None: the whole vocabulary, S = V).
    See `tree_from_candidates`."""
    if head_logits.dim() != 2:
        raise ValueError(f"head_logits must be [K, V], got {tuple(head_logits.shape)}")
    probs, ids = top_candidates(head_logits, top_k, token_ids)
    return tree_from_candidates(probs.tolist(), ids.tolist(), max_nodes)


def tree_from_candidates(probs: list[list[float]], ids: list[list[int]],
                         max_nodes: int) -> tuple[DraftTree, list[float]]:
    """The tree of the heads' candidates (`probs[d]`, `ids[d]`: head d's, best first) and each
    node's score.

    A node at depth d is one of head d-1's candidates; its score is the product of the head
    probabilities along its path: what the heads believe is the chance that the path is the
    model's continuation, so the scores summed are the accepted length the heads expect. The
    `max_nodes` best-scoring nodes are kept, best first (every parent precedes its children, a
    node never outscores its parent, and so every prefix of the list is a tree too). Medusa-1
    heads do not condition on drafted tokens, so every node at depth d chooses among the same
    tokens.
    """
    if max_nodes < 0:
        raise ValueError(f"need max_nodes >= 0, got {max_nodes}")
    num_heads = len(probs)
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    order = 0  # tie-break: earlier pushes (higher parents, better ranks) first
    frontier: list[tuple[float, int, int, int, int]] = []  # (-score, order, parent, depth, rank)
    for rank, p in enumerate(probs[0] if num_heads else []):
        frontier.append((-p, order, -1, 0, rank))
        order += 1
    heapq.heapify(frontier)
    while frontier and len(tokens) < max_nodes:
        neg_score, _, parent, depth, rank = heapq.heappop(frontier)
        node = len(tokens)
        tokens.append(ids[depth][rank])
        parents.append(parent)
        scores.append(-neg_score)
        if depth + 1 < num_heads:
            for child_rank, p in enumerate(probs[depth + 1]):
                heapq.heappush(frontier, (neg_score * p, order, node, depth + 1, child_rank))
                order += 1
    return DraftTree(tokens, parents), scores
