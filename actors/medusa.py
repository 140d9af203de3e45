"""Medusa-1 decoding heads: K extra next-next-token predictors on the model's last hidden state.

Head i is a residual block `h + SiLU(W_i h + b_i)` followed by the model's own LM head (shared and
frozen, never saved). Given the post-final-norm hidden state at the last verified position (the
one whose LM head output gave the next token t), head 0 predicts the token after t, head i the token
i + 1 after t. `W_i` and `b_i` start at zero, so a fresh head is the LM head itself.

Token-conditioned heads (`conditioned`, the sequentially dependent heads of Hydra) also see the
token just before the one they predict, through a small MLP of width F:
`h + O_i SiLU(W_i h + U_i e(x) + b_i) + c_i`, where `e` is the model's own input embedding
(shared and frozen too) and `x` is t for head 0 and, for head i, the token head i - 1 drafted.
`O_i` and `c_i` start at zero (a fresh head is the LM head again); `W_i`, `U_i`, `b_i` start
random, or nothing would learn. A small model's next-next token depends on the next one far more
than its last hidden state shows: on the default model's own answers, head 0 agreed with it 36%
of the time against 26% for a plain head, and a chain of four drafted 0.63 accepted tokens a step
against 0.39 (same data, same training time). Drafting a tree then takes one pass per depth
(`medusa_trees.conditioned_trees`) instead of one for all heads.

Heads are saved as `medusa_heads.safetensors` plus `medusa_config.json` (K, hidden size, vocab,
whether conditioned and F, base model name and fingerprint) and loaded against a model with
`MedusaHeads.load(dir, model)`.
Training may also save `vocab`, the tokens the heads learnt to rank (the model's likeliest tokens
anywhere in its training text): serving then scores only those, a few thousand rows of the LM
head instead of all of it, and the heads' untrained logits elsewhere cannot win a draft.
`medusa_trees` turns the heads' candidates into the sparse tree the engine verifies.
"""

from __future__ import annotations

import hashlib
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
from baton.actors.quantized_linear import QuantizedLinear
from baton.errors import ConfigError, ModelLoadError
from baton.kernels import cpu_decode

log = logging.getLogger(__name__)

WEIGHTS_FILE = "medusa_heads.safetensors"
CONFIG_FILE = "medusa_config.json"
FORMAT = "baton-medusa-1"
CONDITIONED_INNER = 1024  # the MLP width of token-conditioned heads


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
    embed: nn.Module | None

    def __init__(self, lm_head: nn.Module, num_heads: int, hidden_size: int, vocab_size: int,
                 base_model: str = "", fingerprint: str = "", embed: nn.Module | None = None,
                 inner_size: int = CONDITIONED_INNER):
        """With `embed` (the model's input embedding), the heads are token-conditioned, with
        MLPs `inner_size` wide."""
        super().__init__()
        if num_heads < 1:
            raise ConfigError(f"Medusa needs at least one head, got {num_heads}")
        self.conditioned = embed is not None
        self.inner_size = inner_size if self.conditioned else hidden_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.base_model = base_model
        self.fingerprint = fingerprint
        inner = self.inner_size
        self.weight = nn.Parameter(torch.zeros(num_heads, inner, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_heads, inner))
        if self.conditioned:
            self.cond = nn.Parameter(torch.zeros(num_heads, inner, hidden_size))
            self.out = nn.Parameter(torch.zeros(num_heads, hidden_size, inner))
            self.out_bias = nn.Parameter(torch.zeros(num_heads, hidden_size))
            bound = (2 * hidden_size) ** -0.5  # nn.Linear's default over [h; e(x)]
            with torch.no_grad():
                for param in (self.weight, self.cond, self.bias):
                    param.uniform_(-bound, bound)
        self.vocab: torch.Tensor | None = None  # sorted token ids the heads rank; None: all
        # Shared with the model, not owned: kept out of parameters(), state_dict() and .to().
        object.__setattr__(self, "lm_head", lm_head)
        object.__setattr__(self, "embed", embed)
        # Built by `prepare_serving` from the weights above: all heads' projections as one linear,
        # each conditioned head's token and output projections, and the LM head's rows for
        # `vocab`.
        self._proj: nn.Module | None = None
        self._cond: list[nn.Module] = []
        self._out: list[nn.Module] = []
        self._draft_head: nn.Module | None = None

    @classmethod
    def for_model(cls, model: PreTrainedModel, num_heads: int, base_model: str = "",
                  conditioned: bool = False, inner_size: int = CONDITIONED_INNER) -> MedusaHeads:
        """Fresh heads for `model` (the LM head itself, until trained), on its device and in its
        dtype."""
        hidden, vocab = model_dims(model)
        heads = cls(model.get_output_embeddings(), num_heads, hidden, vocab, base_model,
                    model_fingerprint(model),
                    model.get_input_embeddings() if conditioned else None, inner_size)
        return heads.to(*placement(model))

    def head_states(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """[N, H] -> [K, N, H]: each head's residual block output, what the LM head consumes.
        Conditioned heads need `prev [K, N]`: the token before the one each head predicts."""
        proj = torch.einsum("nh,kgh->kng", hidden, self.weight) + self.bias[:, None, :]
        if self.embed is not None:
            if prev is None or prev.shape != (self.num_heads, hidden.shape[0]):
                raise ValueError(f"token-conditioned heads need prev tokens [{self.num_heads}, "
                                 f"{hidden.shape[0]}], got "
                                 f"{None if prev is None else tuple(prev.shape)}")
            proj = proj + torch.einsum("knh,kgh->kng", self.embed(prev).to(proj.dtype), self.cond)
            out = torch.einsum("kng,khg->knh", F.silu(proj), self.out) + self.out_bias[:, None, :]
            return hidden.unsqueeze(0) + out
        return hidden.unsqueeze(0) + F.silu(proj)

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """[N, H] -> [K, N, V]: every head's logits over the full vocabulary."""
        self._check(hidden)
        states = self.head_states(hidden, prev)
        logits = self.lm_head(states.reshape(-1, self.hidden_size))
        return logits.reshape(self.num_heads, hidden.shape[0], -1)

    def candidates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What plain heads' drafting reads: ([K, N, S] logits, the [S] token ids they score),
        over `vocab` when the heads have one (token ids None: the full vocabulary, S = V). Runs
        the layers `prepare_serving` built (on first use, if nobody called it)."""
        if self.conditioned:
            raise ValueError("token-conditioned heads draft depth by depth: "
                             "use conditioned_candidates")
        proj = self.hidden_projections(hidden)
        states = hidden.unsqueeze(0) + F.silu(proj)  # = head_states(hidden), one GEMM
        assert self._draft_head is not None
        logits = self._draft_head(states.reshape(-1, self.hidden_size))
        return logits.view(self.num_heads, hidden.shape[0], -1), self.vocab

    def hidden_projections(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [K, N, F]: every head's `W_i h + b_i`, in one GEMM (F = H: plain heads)."""
        self._check(hidden)
        if self._proj is None or self._draft_head is None:
            self.prepare_serving()
        assert self._proj is not None
        n = hidden.shape[0]
        return self._proj(hidden).view(n, self.num_heads, self.inner_size).transpose(0, 1)

    def conditioned_candidates(self, head: int, proj: torch.Tensor, hidden: torch.Tensor,
                               prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token-conditioned head `head`'s ([R, S] logits, the [S] token ids they score) for rows
        with hidden states `hidden [R, H]`, their `hidden_projections` for this head
        `proj [R, F]` and the tokens before the ones predicted, `prev [R]`."""
        if self.embed is None:
            raise ValueError("these heads are not token-conditioned: use candidates")
        if self._draft_head is None:
            self.prepare_serving()
        assert self._draft_head is not None
        cond = self._cond[head](self.embed(prev).to(proj.dtype))
        states = hidden + self._out[head](F.silu(proj + cond))
        return self._draft_head(states), self.vocab

    def prepare_serving(self) -> MedusaHeads:
        """Fold the heads into one linear and cut the LM head down to `vocab` (packed for oneDNN
        where it can), for `candidates`; call again after changing the weights or `vocab`."""
        # Plain tensors, also when first used under inference mode (from `candidates`).
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = self.weight.detach(), self.bias.detach()
            proj = _linear(weight.reshape(-1, self.hidden_size), bias.reshape(-1))
            cond: list[nn.Module] = []
            out: list[nn.Module] = []
            if self.conditioned:
                cond = [_linear(w) for w in self.cond.detach()]
                out = [_linear(w, b) for w, b in zip(self.out.detach(), self.out_bias.detach(),
                                                     strict=True)]
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
                proj = _serving_linear(proj)
                cond = [_serving_linear(layer) for layer in cond]
                out = [_serving_linear(layer) for layer in out]
                head = _serving_linear(head) if isinstance(head, nn.Linear) else head
        object.__setattr__(self, "_proj", proj)
        object.__setattr__(self, "_cond", cond)
        object.__setattr__(self, "_out", out)
        object.__setattr__(self, "_draft_head", head)
        return self

    def train(self, mode: bool = True) -> MedusaHeads:
        """Training changes the weights: the serving layers are rebuilt on next use."""
        if mode:
            object.__setattr__(self, "_proj", None)
            object.__setattr__(self, "_cond", [])
            object.__setattr__(self, "_out", [])
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
            "conditioned": self.conditioned,
            "inner_size": self.inner_size,
            "base_model": self.base_model,
            "fingerprint": self.fingerprint,
        }

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the heads (float32) and their config into `directory`; `extra` joins the JSON."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().float().cpu().contiguous(),
                   "bias": self.bias.detach().float().cpu().contiguous()}
        if self.conditioned:
            for name in ("cond", "out", "out_bias"):
                tensors[name] = getattr(self, name).detach().float().cpu().contiguous()
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
            conditioned = bool(cfg.get("conditioned", False))
            inner = int(cfg.get("inner_size", hidden))
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
        expected = {"weight": (num_heads, inner, hidden), "bias": (num_heads, inner)}
        if conditioned:
            expected.update(cond=(num_heads, inner, hidden), out=(num_heads, hidden, inner),
                            out_bias=(num_heads, hidden))
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
                    str(cfg.get("base_model", "")), fingerprint,
                    model.get_input_embeddings() if conditioned else None, inner)
        heads.load_state_dict(tensors)
        heads = heads.to(*placement(model)).eval().requires_grad_(False)
        if vocab_ids is not None:
            heads.vocab = vocab_ids.to(heads.weight.device)
        return heads.prepare_serving()


def _serving_linear(layer: nn.Linear) -> nn.Module:
    """A drafting layer as served on the CPU: weight-only int8 on Baton's skinny kernel where it
    takes the weight, else packed for oneDNN. A tree of the default model's conditioned heads
    reads some 48 MB of weights (the vocabulary's LM head rows once a depth), nearly all of it
    cold after the step's forward; int8 halves that. Drafts only propose, so the output stays
    the model's own; measured on chat requests, trees took 1.87 against 2.14 ms and Medusa ran
    1.19x against 1.15x `none`, at the same tokens a pass."""
    if cpu_decode.takes_int8(layer.weight):
        return QuantizedLinear(layer, "int8")
    return PackedLinear(layer)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear holding a copy of `weight [out, in]` (and `bias`)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def linear_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's plain [out, in] weight and its bias (packed layers unpack theirs)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ConfigError("Medusa heads need a plain linear LM head (load the model unquantized)")
    bias = getattr(module, "bias", None)
    return weight.detach(), bias.detach() if isinstance(bias, torch.Tensor) else None
